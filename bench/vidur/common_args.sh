# shared vidur CLI args (sourced by run.sh); $CDS/$NDS = dataset ids
P=--random_forrest_execution_time_predictor_config
VIDUR_ARGS=(
  --replica_config_model_name meta-llama/Llama-2-7b-hf
  --replica_config_device a100 --replica_config_network_device a100_pairwise_nvlink
  --replica_config_tensor_parallel_size 1 --replica_config_num_pipeline_stages 1
  --global_scheduler_config_type round_robin
  --request_generator_config_type synthetic
  --length_generator_config_type fixed
  --fixed_request_length_generator_config_prefill_tokens 1000
  --fixed_request_length_generator_config_decode_tokens 100
  --execution_time_predictor_config_type random_forrest
  ${P}_model_profiling_dataset $CDS ${P}_network_profiling_dataset $NDS
  ${P}_cache_dir .vidur_cache
  ${P}_prediction_max_tokens_per_request 8192
  ${P}_num_estimators 100 ${P}_max_depth 16 ${P}_min_samples_split 2
  ${P}_k_fold_cv_splits 2 ${P}_num_training_job_threads 1
  --no-metrics_config_write_metrics --no-metrics_config_store_plots
  --no-metrics_config_enable_chrome_trace --no-metrics_config_write_json_trace
  --metrics_config_output_dir sim_out
)
