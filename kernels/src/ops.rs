//! The op set. Each op checks shapes and dtypes, then dispatches on the tensors' storage.

use half::bf16;

pub use crate::shape::{AttnSeq, GqaShape, MlaShape, PAGE_TOKENS};
use crate::tensor::Storage;
use crate::{Result, Tensor, cpu, shape_err};

/// Applies `f` to the weight/pool slice whatever its element type.
macro_rules! with_elem {
    ($t:expr, $v:ident => $body:expr) => {
        match &$t.storage {
            Storage::F32($v) => $body,
            Storage::BF16($v) => $body,
        }
    };
}

/// `x[m, k] · W[n, k]ᵀ → [m, n]`, f32 accumulation, W in f32 or BF16.
pub fn matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (m, k) = x.dims2("matmul")?;
    let (n, kw) = w.dims2("matmul")?;
    if k != kw {
        return shape_err("matmul", format!("x {:?} · W {:?}ᵀ", x.shape(), w.shape()));
    }
    let xs = x.f32s("matmul")?;
    let mut out = vec![0.0f32; m * n];
    with_elem!(w, ws => cpu::matmul::matmul(xs, m, k, ws, n, &mut out));
    Tensor::from_f32(&[m, n], out, x.device())
}

/// Several `x · Wᵀ` at once (a grouped GEMM): MoE experts of one step, or projections of one
/// input. Same results as calling [`matmul`] on each pair; fewer trips through the thread pool.
pub fn matmul_grouped(pairs: &[(&Tensor, &Tensor)]) -> Result<Vec<Tensor>> {
    let mut dims = Vec::with_capacity(pairs.len());
    for (x, w) in pairs {
        let (m, k) = x.dims2("matmul_grouped")?;
        let (n, kw) = w.dims2("matmul_grouped")?;
        if k != kw {
            return shape_err(
                "matmul_grouped",
                format!("x {:?} · W {:?}ᵀ", x.shape(), w.shape()),
            );
        }
        x.f32s("matmul_grouped")?;
        dims.push((m, k, n));
    }
    let mut outs: Vec<Vec<f32>> = dims.iter().map(|&(m, _, n)| vec![0.0f32; m * n]).collect();
    let all_f32 = pairs
        .iter()
        .all(|(_, w)| matches!(w.storage, Storage::F32(_)));
    let all_bf16 = pairs
        .iter()
        .all(|(_, w)| matches!(w.storage, Storage::BF16(_)));
    macro_rules! grouped {
        ($variant:ident) => {{
            let mut problems: Vec<cpu::matmul::Problem<'_, _>> = pairs
                .iter()
                .zip(&dims)
                .zip(outs.iter_mut())
                .map(|(((x, w), &(m, k, n)), out)| {
                    let Storage::$variant(ws) = &w.storage else {
                        unreachable!("checked above")
                    };
                    let Storage::F32(xs) = &x.storage else {
                        unreachable!("checked above")
                    };
                    cpu::matmul::Problem {
                        x: xs,
                        m,
                        k,
                        w: ws,
                        n,
                        out,
                    }
                })
                .collect();
            cpu::matmul::matmul_grouped(&mut problems);
        }};
    }
    if all_bf16 {
        grouped!(BF16);
    } else if all_f32 {
        grouped!(F32);
    } else {
        return pairs.iter().map(|(x, w)| matmul(x, w)).collect();
    }
    outs.into_iter()
        .zip(&dims)
        .map(|(o, &(m, _, n))| Tensor::from_f32(&[m, n], o, Default::default()))
        .collect()
}

/// RMSNorm over the last dimension (its width is `weight`'s length).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let w = weight.f32s("rms_norm")?;
    let xs = x.f32s("rms_norm")?;
    if w.is_empty() || xs.len() % w.len() != 0 {
        return shape_err(
            "rms_norm",
            format!("x {:?}, weight {:?}", x.shape(), weight.shape()),
        );
    }
    let mut out = vec![0.0; xs.len()];
    cpu::rms_norm(xs, w, eps, &mut out);
    Tensor::from_f32(x.shape(), out, x.device())
}

/// `silu(gate) · up` for rows `[gate | up]` of width `2·inter` → `[m, inter]`.
pub fn silu_mul(gate_up: &Tensor) -> Result<Tensor> {
    let (m, w2) = gate_up.dims2("silu_mul")?;
    if w2 % 2 != 0 {
        return shape_err("silu_mul", format!("odd width {w2}"));
    }
    let mut out = vec![0.0; m * w2 / 2];
    cpu::silu_mul(gate_up.f32s("silu_mul")?, w2 / 2, &mut out);
    Tensor::from_f32(&[m, w2 / 2], out, gate_up.device())
}

/// `a += b`, same shapes.
pub fn add_inplace(a: &mut Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return shape_err("add", format!("{:?} + {:?}", a.shape(), b.shape()));
    }
    let bs = b.f32s("add")?;
    for (x, y) in a.f32s_mut("add")?.iter_mut().zip(bs) {
        *x += y;
    }
    Ok(())
}

/// Rows of an embedding table `[vocab, d]` → `[ids.len(), d]` f32. An id outside the table is
/// an error, not a panic: ids come from users.
pub fn embedding(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    let (vocab, d) = table.dims2("embedding")?;
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        return shape_err(
            "embedding",
            format!("token id {bad} outside vocabulary of {vocab}"),
        );
    }
    let mut out = Vec::with_capacity(ids.len() * d);
    with_elem!(table, t => {
        for &i in ids {
            out.extend(t[i as usize * d..(i as usize + 1) * d].iter().map(|v| cpu::Elem::to_f32(*v)));
        }
    });
    Tensor::from_f32(&[ids.len(), d], out, table.device())
}

/// Splits the columns of a 2-D tensor into consecutive parts of the given widths.
pub fn split_cols(x: &Tensor, widths: &[usize]) -> Result<Vec<Tensor>> {
    let (m, n) = x.dims2("split_cols")?;
    if widths.iter().sum::<usize>() != n {
        return shape_err(
            "split_cols",
            format!("widths {widths:?} of {:?}", x.shape()),
        );
    }
    let xs = x.f32s("split_cols")?;
    let mut parts: Vec<Vec<f32>> = widths.iter().map(|w| Vec::with_capacity(m * w)).collect();
    for row in xs.chunks(n) {
        let mut c = 0;
        for (p, &w) in parts.iter_mut().zip(widths) {
            p.extend_from_slice(&row[c..c + w]);
            c += w;
        }
    }
    parts
        .into_iter()
        .zip(widths)
        .map(|(p, &w)| Tensor::from_f32(&[m, w], p, x.device()))
        .collect()
}

/// Concatenates 2-D tensors with the same row count along columns.
pub fn concat_cols(parts: &[&Tensor]) -> Result<Tensor> {
    let m = parts.first().map(|p| p.shape()[0]).unwrap_or(0);
    let mut widths = Vec::new();
    for p in parts {
        let (pm, pw) = p.dims2("concat_cols")?;
        if pm != m {
            return shape_err("concat_cols", "row counts differ".into());
        }
        widths.push(pw);
    }
    let n: usize = widths.iter().sum();
    let mut out = Vec::with_capacity(m * n);
    let slices: Vec<&[f32]> = parts
        .iter()
        .map(|p| p.f32s("concat_cols"))
        .collect::<Result<_>>()?;
    for r in 0..m {
        for (s, &w) in slices.iter().zip(&widths) {
            out.extend_from_slice(&s[r * w..(r + 1) * w]);
        }
    }
    Tensor::from_f32(&[m, n], out, Default::default())
}

/// Rotates, in place, the `rope` dims starting at column `offset` of every head of `x`
/// (`[rows, heads · head_dim]`), row `r` at position `positions[r]`, DeepSeek's interleaved pairs.
/// `cos`/`sin` are `[max_positions, rope/2]` tables (see [`crate::rope`]).
pub fn rope_inplace(
    x: &mut Tensor,
    heads: usize,
    head_dim: usize,
    offset: usize,
    positions: &[u32],
    cos: &Tensor,
    sin: &Tensor,
) -> Result<()> {
    let (m, w) = x.dims2("rope")?;
    let (max_pos, half) = cos.dims2("rope")?;
    if w != heads * head_dim || offset + 2 * half > head_dim || positions.len() != m {
        return shape_err(
            "rope",
            format!(
                "x {:?}, heads {heads}×{head_dim}, offset {offset}, rope {}, {} positions",
                x.shape(),
                2 * half,
                positions.len()
            ),
        );
    }
    if let Some(p) = positions.iter().find(|&&p| p as usize >= max_pos) {
        return shape_err(
            "rope",
            format!("position {p} beyond the rope table of {max_pos} (max_position_embeddings)"),
        );
    }
    let (c, s) = (cos.f32s("rope")?, sin.f32s("rope")?);
    let xs = x.f32s_mut("rope")?;
    for (r, row) in xs.chunks_mut(w).enumerate() {
        let p = positions[r] as usize;
        let (cr, sr) = (&c[p * half..(p + 1) * half], &s[p * half..(p + 1) * half]);
        for h in 0..heads {
            let base = h * head_dim + offset;
            cpu::rope_pairs(&mut row[base..base + 2 * half], cr, sr);
        }
    }
    Ok(())
}

/// Rotates, in place, every whole head of `x` (`[rows, heads · head_dim]`) in the "rotate half"
/// layout of Llama and Qwen2: dims `i` and `i + head_dim/2` form a pair. `cos`/`sin` are
/// `[max_positions, head_dim/2]` tables (see [`crate::rope`]).
pub fn rope_halves_inplace(
    x: &mut Tensor,
    heads: usize,
    head_dim: usize,
    positions: &[u32],
    cos: &Tensor,
    sin: &Tensor,
) -> Result<()> {
    let (m, w) = x.dims2("rope_halves")?;
    let (max_pos, half) = cos.dims2("rope_halves")?;
    if w != heads * head_dim
        || 2 * half != head_dim
        || sin.shape() != cos.shape()
        || positions.len() != m
    {
        return shape_err(
            "rope_halves",
            format!(
                "x {:?}, heads {heads}×{head_dim}, table {:?}, {} positions",
                x.shape(),
                cos.shape(),
                positions.len()
            ),
        );
    }
    if let Some(p) = positions.iter().find(|&&p| p as usize >= max_pos) {
        return shape_err(
            "rope_halves",
            format!("position {p} beyond the rope table of {max_pos} (max_position_embeddings)"),
        );
    }
    let (c, s) = (cos.f32s("rope_halves")?, sin.f32s("rope_halves")?);
    let xs = x.f32s_mut("rope_halves")?;
    for (r, row) in xs.chunks_mut(w).enumerate() {
        let p = positions[r] as usize;
        let (cr, sr) = (&c[p * half..(p + 1) * half], &s[p * half..(p + 1) * half]);
        for head in row.chunks_mut(head_dim) {
            cpu::rope_halves(head, cr, sr);
        }
    }
    Ok(())
}

/// `x[r] += bias` for every row `r` of `x` (`[rows, n]`, bias `[n]`).
pub fn add_bias_inplace(x: &mut Tensor, bias: &Tensor) -> Result<()> {
    let (_, n) = x.dims2("add_bias")?;
    if bias.shape() != [n] {
        return shape_err(
            "add_bias",
            format!("x {:?}, bias {:?}", x.shape(), bias.shape()),
        );
    }
    let b = bias.f32s("add_bias")?.to_vec();
    for row in x.f32s_mut("add_bias")?.chunks_mut(n) {
        for (v, bv) in row.iter_mut().zip(&b) {
            *v += bv;
        }
    }
    Ok(())
}

/// Copies the given rows of `x` (`rows[i]` becomes output row `i`).
pub fn gather_rows(x: &Tensor, rows: &[u32]) -> Result<Tensor> {
    let (m, n) = x.dims2("gather_rows")?;
    if rows.iter().any(|&r| r as usize >= m) {
        return shape_err("gather_rows", format!("row index outside {m}"));
    }
    let xs = x.f32s("gather_rows")?;
    let mut out = Vec::with_capacity(rows.len() * n);
    for &r in rows {
        out.extend_from_slice(&xs[r as usize * n..(r as usize + 1) * n]);
    }
    Tensor::from_f32(&[rows.len(), n], out, x.device())
}

/// `out[rows[i]] += weights[i] · src[i]`.
pub fn scatter_add_rows(
    out: &mut Tensor,
    src: &Tensor,
    rows: &[u32],
    weights: &[f32],
) -> Result<()> {
    let (m, n) = out.dims2("scatter_add_rows")?;
    let (sm, sn) = src.dims2("scatter_add_rows")?;
    if sn != n || sm != rows.len() || weights.len() != sm || rows.iter().any(|&r| r as usize >= m) {
        return shape_err(
            "scatter_add_rows",
            format!(
                "out {:?}, src {:?}, {} rows",
                out.shape(),
                src.shape(),
                rows.len()
            ),
        );
    }
    let ss = src.f32s("scatter_add_rows")?;
    let os = out.f32s_mut("scatter_add_rows")?;
    for (i, &r) in rows.iter().enumerate() {
        let dst = &mut os[r as usize * n..(r as usize + 1) * n];
        for (d, s) in dst.iter_mut().zip(&ss[i * n..(i + 1) * n]) {
            *d += weights[i] * s;
        }
    }
    Ok(())
}

/// `x *= alpha`.
pub fn scale_inplace(x: &mut Tensor, alpha: f32) -> Result<()> {
    for v in x.f32s_mut("scale")? {
        *v *= alpha;
    }
    Ok(())
}

fn check_pool(op: &'static str, pool: &Tensor, width: usize) -> Result<usize> {
    match pool.shape() {
        [pages, PAGE_TOKENS, w] if *w == width => Ok(*pages),
        s => shape_err(
            op,
            format!("pool {s:?}, expected [pages, {PAGE_TOKENS}, {width}]"),
        ),
    }
}

/// Writes latent rows `[m, width]` into pool slots (`slot = page · PAGE_TOKENS + offset`).
pub fn kv_cache_write(pool: &mut Tensor, latent: &Tensor, slots: &[u32]) -> Result<()> {
    let (m, width) = latent.dims2("kv_cache_write")?;
    let pages = check_pool("kv_cache_write", pool, width)?;
    if slots.len() != m || slots.iter().any(|&s| s as usize >= pages * PAGE_TOKENS) {
        return shape_err(
            "kv_cache_write",
            format!("{} slots for {m} rows in {pages} pages", slots.len()),
        );
    }
    let ls = latent.f32s("kv_cache_write")?;
    match &mut pool.storage {
        Storage::F32(p) => {
            for (i, &s) in slots.iter().enumerate() {
                let s = s as usize;
                p[s * width..(s + 1) * width].copy_from_slice(&ls[i * width..(i + 1) * width]);
            }
        }
        Storage::BF16(p) => {
            for (i, &s) in slots.iter().enumerate() {
                let s = s as usize;
                for (d, v) in p[s * width..(s + 1) * width]
                    .iter_mut()
                    .zip(&ls[i * width..(i + 1) * width])
                {
                    *d = bf16::from_f32(*v);
                }
            }
        }
    }
    Ok(())
}

/// Bytes of one page of a pool (`PAGE_TOKENS × width` elements), the unit KV transfer moves.
pub fn kv_page_bytes(pool: &Tensor) -> usize {
    pool.size_bytes() / pool.shape().first().copied().unwrap_or(1).max(1)
}

fn check_pages(op: &'static str, pool: &Tensor, pages: &[u32], bytes: usize) -> Result<usize> {
    let page_bytes = kv_page_bytes(pool);
    let total = pool.shape().first().copied().unwrap_or(0);
    if pool.shape().len() != 3 || pages.iter().any(|&p| p as usize >= total) {
        return shape_err(op, format!("pages {pages:?} of a pool {:?}", pool.shape()));
    }
    if bytes != pages.len() * page_bytes {
        return shape_err(
            op,
            format!("{bytes} bytes for {} pages of {page_bytes}", pages.len()),
        );
    }
    Ok(page_bytes)
}

/// Copies whole pages of a pool out as raw bytes in the pool's dtype (native byte order), page by
/// page in the order given: the wire form of a KV transfer, so no conversion happens on either
/// side.
pub fn kv_pages_read(pool: &Tensor, pages: &[u32], out: &mut Vec<u8>) -> Result<()> {
    let page_bytes = check_pages(
        "kv_pages_read",
        pool,
        pages,
        pages.len() * kv_page_bytes(pool),
    )?;
    let raw = pool_bytes(&pool.storage);
    out.reserve(pages.len() * page_bytes);
    for &p in pages {
        let at = p as usize * page_bytes;
        out.extend_from_slice(&raw[at..at + page_bytes]);
    }
    Ok(())
}

/// Writes raw page bytes (as produced by [`kv_pages_read`] on a pool of the same shape and dtype)
/// into the given pages.
pub fn kv_pages_write(pool: &mut Tensor, pages: &[u32], bytes: &[u8]) -> Result<()> {
    let page_bytes = check_pages("kv_pages_write", pool, pages, bytes.len())?;
    let raw = pool_bytes_mut(&mut pool.storage);
    for (i, &p) in pages.iter().enumerate() {
        let at = p as usize * page_bytes;
        raw[at..at + page_bytes].copy_from_slice(&bytes[i * page_bytes..(i + 1) * page_bytes]);
    }
    Ok(())
}

fn pool_bytes(s: &Storage) -> &[u8] {
    match s {
        // SAFETY: f32 and bf16 are plain data with no padding and no invalid bit patterns; the
        // byte view covers exactly the vector's initialised elements and borrows it immutably.
        Storage::F32(v) => unsafe {
            std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(&v[..]))
        },
        // SAFETY: as above.
        Storage::BF16(v) => unsafe {
            std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(&v[..]))
        },
    }
}

fn pool_bytes_mut(s: &mut Storage) -> &mut [u8] {
    match s {
        // SAFETY: any byte pattern is a valid f32 / bf16, so writing arbitrary bytes through the
        // view cannot create an invalid value; the view borrows the vector exclusively.
        Storage::F32(v) => unsafe {
            std::slice::from_raw_parts_mut(
                v.as_mut_ptr().cast::<u8>(),
                std::mem::size_of_val(&v[..]),
            )
        },
        // SAFETY: as above.
        Storage::BF16(v) => unsafe {
            std::slice::from_raw_parts_mut(
                v.as_mut_ptr().cast::<u8>(),
                std::mem::size_of_val(&v[..]),
            )
        },
    }
}

fn check_seqs(op: &'static str, t: usize, pages: usize, seqs: &[AttnSeq<'_>]) -> Result<()> {
    let mut rows = 0;
    for seq in seqs {
        let pages_needed = seq.ctx_len.div_ceil(PAGE_TOKENS);
        if seq.q_row != rows
            || seq.q_len == 0
            || seq.q_len > seq.ctx_len
            || seq.block_table.len() < pages_needed
            || seq.block_table[..pages_needed]
                .iter()
                .any(|&p| p as usize >= pages)
        {
            return shape_err(
                op,
                format!("bad sequence span {seq:?} (rows so far {rows}, {pages} pages)"),
            );
        }
        rows += seq.q_len;
    }
    if rows != t {
        return shape_err(op, format!("sequences cover {rows} rows of {t}"));
    }
    Ok(())
}

fn check_gqa(
    op: &'static str,
    q: &Tensor,
    pool: &Tensor,
    seqs: &[AttnSeq<'_>],
    s: &GqaShape,
) -> Result<usize> {
    let (t, qw) = q.dims2(op)?;
    if s.kv_heads == 0 || s.head_dim == 0 || !s.heads.is_multiple_of(s.kv_heads) {
        return shape_err(op, format!("{s:?}: heads must be a multiple of kv_heads"));
    }
    if qw != s.heads * s.head_dim {
        return shape_err(op, format!("q {:?} for {s:?}", q.shape()));
    }
    let pages = check_pool(op, pool, s.pool_width())?;
    check_seqs(op, t, pages, seqs)?;
    Ok(t)
}

macro_rules! gqa_op {
    ($name:ident, $cpu:path, $doc:literal) => {
        #[doc = $doc]
        pub fn $name(
            q: &Tensor,
            pool: &Tensor,
            seqs: &[AttnSeq<'_>],
            s: &GqaShape,
            softmax_scale: f32,
        ) -> Result<Tensor> {
            let t = check_gqa(stringify!($name), q, pool, seqs, s)?;
            let qs = q.f32s(stringify!($name))?;
            let mut out = vec![0.0f32; t * s.heads * s.head_dim];
            with_elem!(pool, p => $cpu(qs, p, seqs, s, softmax_scale, &mut out));
            Tensor::from_f32(&[t, s.heads * s.head_dim], out, q.device())
        }
    };
}

gqa_op!(
    gqa_prefill,
    cpu::gqa::gqa_prefill,
    "Grouped-query attention, prefill form (context gathered once per kv head, matmuls per query head).\n\n`q` is `[T, heads·head_dim]` with rope applied; the pool (`[pages, PAGE_TOKENS, 2·kv_heads·head_dim]`, `[k | v]` per token) already holds the new tokens. Returns `[T, heads·head_dim]`."
);
gqa_op!(
    gqa_decode,
    cpu::gqa::gqa_decode,
    "Grouped-query attention, decode form (straight from the pool rows, parallel over heads). Same contract as [`gqa_prefill`]."
);

fn check_attention(
    op: &'static str,
    q: &Tensor,
    kv_b: &Tensor,
    pool: &Tensor,
    seqs: &[AttnSeq<'_>],
    s: &MlaShape,
) -> Result<usize> {
    let (t, qw) = q.dims2(op)?;
    if qw != s.heads * (s.nope + s.rope) {
        return shape_err(op, format!("q {:?} for {s:?}", q.shape()));
    }
    if kv_b.shape() != [s.heads * (s.nope + s.v), s.kv_lora] {
        return shape_err(op, format!("kv_b {:?} for {s:?}", kv_b.shape()));
    }
    let pages = check_pool(op, pool, s.kv_lora + s.rope)?;
    check_seqs(op, t, pages, seqs)?;
    Ok(t)
}

macro_rules! attention_op {
    ($name:ident, $cpu:path, $doc:literal) => {
        #[doc = $doc]
        pub fn $name(
            q: &Tensor,
            kv_b: &Tensor,
            pool: &Tensor,
            seqs: &[AttnSeq<'_>],
            s: &MlaShape,
            softmax_scale: f32,
        ) -> Result<Tensor> {
            let t = check_attention(stringify!($name), q, kv_b, pool, seqs, s)?;
            let qs = q.f32s(stringify!($name))?;
            let mut out = vec![0.0f32; t * s.heads * s.v];
            with_elem!(kv_b, w => with_elem!(pool, p => $cpu(qs, w, p, seqs, s, softmax_scale, &mut out)));
            Tensor::from_f32(&[t, s.heads * s.v], out, q.device())
        }
    };
}

attention_op!(
    mla_prefill,
    cpu::attention::mla_prefill,
    "MLA attention, prefill form: decompress the context through `kv_b_proj`, then causal MHA.\n\n`q` is `[T, H·(nope+rope)]` with rope applied; the pool already holds the new tokens. Returns `[T, H·v]`."
);
attention_op!(
    mla_absorbed,
    cpu::attention::mla_absorbed,
    "MLA attention, weight-absorbed (decode) form over the 576-wide latent cache. Same contract as [`mla_prefill`]."
);

/// Index of the largest value in each row of `[m, n]` logits (ties: the lowest index).
pub fn argmax_rows(x: &Tensor) -> Result<Vec<u32>> {
    let (_, n) = x.dims2("argmax_rows")?;
    let xs = x.f32s("argmax_rows")?;
    Ok(xs
        .chunks(n)
        .map(|row| {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect())
}
