//! The layer sender in virtual time (tokio's paused clock): transfer overlaps compute.

use std::sync::Mutex;
use std::time::Duration;

use duet_transport::{SendFuture, TransportError};

use super::*;

/// A link that takes `per_frame` to accept each frame, one at a time, and records the order.
struct SlowLink {
    per_frame: Duration,
    sent: Mutex<Vec<(SeqId, u32)>>,
    fail_seq: Option<SeqId>,
}

impl KvTransport for SlowLink {
    fn send(&self, _dest: u32, frame: KvFrame) -> SendFuture<'_> {
        Box::pin(async move {
            tokio::time::sleep(self.per_frame).await;
            if Some(frame.seq) == self.fail_seq {
                return Err(TransportError::Closed(99));
            }
            self.sent.lock().unwrap().push((frame.seq, frame.layer));
            Ok(())
        })
    }

    fn name(&self) -> &'static str {
        "slow"
    }
}

fn frame(seq: SeqId, layer: u32) -> KvFrame {
    let layout = duet_transport::KvLayout {
        attention: duet_transport::KvAttention::Mla,
        elem_bytes: 2,
        width: 576,
    };
    KvFrame::new(seq, layer, layout, vec![0], vec![0; 16])
}

const LAYERS: u32 = 20;
const LAYER: Duration = Duration::from_millis(10);

/// Runs `LAYERS` layers of `LAYER` compute each, handing each layer's frame to the sender, over a
/// link as slow as the compute; returns the virtual time until every frame was accepted.
async fn prefill_over(
    link: Arc<SlowLink>,
    in_flight: usize,
) -> (Duration, BTreeMap<SeqId, SendError>) {
    let start = tokio::time::Instant::now();
    let stats = Arc::new(WorkerStats::new());
    let sender = LayerSender::start(
        &tokio::runtime::Handle::current(),
        link,
        in_flight,
        stats.clone(),
    );
    for layer in 0..LAYERS {
        tokio::time::sleep(LAYER).await; // the layer's compute
        sender.push(1, frame(7, layer)).await;
    }
    let errors = sender
        .finish()
        .await
        .expect("the sender task ends normally");
    (start.elapsed(), errors)
}

#[tokio::test(start_paused = true)]
async fn a_transfer_as_long_as_a_layer_overlaps_the_next_layers_compute() {
    let link = Arc::new(SlowLink {
        per_frame: LAYER,
        sent: Mutex::new(Vec::new()),
        fail_seq: None,
    });
    let (took, errors) = prefill_over(link.clone(), KV_FRAMES_IN_FLIGHT).await;
    assert!(errors.is_empty(), "{errors:?}");
    // Overlapped: the compute of all layers plus the last layer's transfer (max + one layer),
    // where sending inside the forward pass would take compute + transfer (the sum).
    assert_eq!(took, LAYER * (LAYERS + 1));
    let sent = link.sent.lock().unwrap().clone();
    assert_eq!(
        sent,
        (0..LAYERS).map(|l| (7, l)).collect::<Vec<_>>(),
        "in order"
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_link_holds_back_the_compute_at_the_in_flight_bound() {
    // A link 3× slower than the compute: the queue fills and the forward pass waits for it, so
    // at most the bound is ever buffered and the total is the link's time.
    let link = Arc::new(SlowLink {
        per_frame: LAYER * 3,
        sent: Mutex::new(Vec::new()),
        fail_seq: None,
    });
    let (took, _) = prefill_over(link, 2).await;
    assert_eq!(took, LAYER * 3 * LAYERS + LAYER);
}

#[tokio::test(start_paused = true)]
async fn a_failed_frame_is_reported_once_and_the_sequence_s_later_frames_are_not_sent() {
    let link = Arc::new(SlowLink {
        per_frame: LAYER,
        sent: Mutex::new(Vec::new()),
        fail_seq: Some(7),
    });
    let (took, errors) = prefill_over(link.clone(), KV_FRAMES_IN_FLIGHT).await;
    assert_eq!(errors.len(), 1);
    assert!(
        errors[&7].to_string().contains("endpoint 99 closed"),
        "{errors:?}"
    );
    assert!(link.sent.lock().unwrap().is_empty());
    // Only the first frame went to the link; the rest were dropped at once, so the compute
    // alone sets the time.
    assert_eq!(took, LAYER * LAYERS);
}
