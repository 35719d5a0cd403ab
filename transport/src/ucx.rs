//! KV frames over UCX (feature `ucx`): RMA put into the receiver's registered staging memory.
//!
//! The protocol (README.md has the message layouts):
//!
//! 1. The receiver ([`UcxKvServer`]) binds an endpoint and issues a [`UcxGrant`] per sender: a
//!    staging region of `slots × slot_bytes` allocated and registered with `ucp_mem_map`, its
//!    address, its packed remote key (`ucp_rkey_pack`) and the receiver's worker address. The
//!    grant is plain bytes ([`UcxGrant::to_bytes`]) handed to the sender out of band — in this
//!    crate's tests and benchmark directly in process; in a cluster over the authenticated QUIC
//!    control connection. UCX itself authenticates nothing: whoever holds a grant can write
//!    into that region, so grants travel only over the authenticated control plane.
//! 2. The sender ([`UcxTransport::connect`]) creates an endpoint to the worker address and
//!    unpacks the remote key. It starts with one credit per slot.
//! 3. Per frame: take a credit (a free slot; waiting here is the back-pressure), `ucp_put_nbx`
//!    the bytes into that slot, `ucp_ep_flush_nbx` (the put is now complete at the target), then
//!    an active message (`ucp_am_send_nbx`, eager, with a reply endpoint) carrying the slot and
//!    the frame's wire header and index (page ids and CRC-32s; `wire.rs`).
//! 4. The receiver's AM handler queues the notice; its progress thread, once the endpoint's
//!    inbox has room, copies the slot out into the frame, verifies every page's checksum,
//!    delivers the frame (or the verification error), and answers with a credit for the slot.
//!    If the inbox is gone it answers `closed` (or `unknown` for an unknown grant) instead, and
//!    the sender's next send fails with that error.
//!
//! Threads: each side owns one UCX context and one worker, driven by a progress thread that is
//! the only caller of any worker function (`UCS_THREAD_MODE_SINGLE`). Async callers talk to it
//! through a command channel. The thread busy-polls while work is in flight and for
//! [`PROGRESS_SPIN`] after, then polls every [`PROGRESS_IDLE_POLL`]; dropping the server or
//! transport stops and joins it, after which the UCX objects are released.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::{CStr, CString, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use ucx_sys as sys;

const _: () = assert!(
    sys::AVAILABLE,
    "the `ucx` feature needs the system UCX: apt-get install -y libucx-dev ucx-utils libclang-dev"
);

use crate::wire::{self, FrameHeader, HEADER_LEN};
use crate::{EndpointId, KvFrame, KvInbox, KvTransport, SendFuture, TransportError, verified};

/// AM id of a frame notice (sender → receiver).
const AM_NOTICE: u32 = 0x4b56;
/// AM id of a credit or refusal (receiver → sender).
const AM_REPLY: u32 = 0x4b57;
/// Notice prefix before the frame header: grant u32, slot u32, sender token u32, reserved u32.
const NOTICE_PREFIX_LEN: usize = 16;
/// Reply: kind u8, reserved [u8; 3], grant u32, slot u32, sender token u32.
const REPLY_LEN: usize = 16;
const REPLY_CREDIT: u8 = 1;
const REPLY_CLOSED: u8 = 2;
const REPLY_UNKNOWN: u8 = 3;
const REPLY_PROTOCOL: u8 = 4;
const GRANT_MAGIC: [u8; 4] = *b"DUKG";

/// After any activity the progress thread keeps polling without sleeping for this long (1 ms):
/// a layer-wise handoff sends a frame every few hundred µs, and a sleep between them would add
/// its length to every frame.
pub const PROGRESS_SPIN: Duration = Duration::from_millis(1);
/// An idle progress thread checks for commands and network events this often (200 µs): the
/// latency added to the first frame after a pause, at ≈ 5,000 wake-ups per second when idle.
pub const PROGRESS_IDLE_POLL: Duration = Duration::from_micros(200);
/// At shutdown, outstanding UCX requests get this many progress calls to finish before the
/// worker is destroyed anyway.
const STOP_DRAIN_ITERATIONS: usize = 100_000;

/// Staging geometry and transport choice of one UCX context.
#[derive(Debug, Clone)]
pub struct UcxConfig {
    /// Value for UCX's `TLS` setting (as `UCX_TLS`), e.g. `"sysv,posix,cma,self"` or `"tcp"`;
    /// `None` keeps UCX's own choice (and the process environment).
    pub tls: Option<String>,
    /// Bytes of one staging slot: the largest frame this receiver accepts. 8 MiB holds a
    /// DeepSeek-V3 layer of 64 pages in BF16 (4.5 MiB).
    pub slot_bytes: usize,
    /// Slots per grant: frames one sender may have in flight to one endpoint. 8 lets the
    /// sender's put of one layer overlap the receiver's copy-out of the previous ones.
    pub slots: u32,
}

impl Default for UcxConfig {
    fn default() -> Self {
        Self {
            tls: None,
            slot_bytes: 8 << 20,
            slots: 8,
        }
    }
}

/// Largest staging region one grant may describe (4 GiB), so a forged grant cannot make a
/// sender compute addresses past any real mapping.
pub const GRANT_BYTES_MAX: u64 = 4 << 30;
/// Largest worker address or packed remote key a grant may carry (64 KiB each).
const GRANT_BLOB_MAX: usize = 64 << 10;

/// What a sender needs to write into one receiver endpoint's staging region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UcxGrant {
    pub endpoint: EndpointId,
    pub grant: u32,
    pub base_addr: u64,
    pub slot_bytes: u64,
    pub slots: u32,
    pub worker_address: Vec<u8>,
    pub rkey: Vec<u8>,
}

impl UcxGrant {
    /// Layout: magic "DUKG", endpoint u32, grant u32, slots u32, base u64, slot_bytes u64,
    /// address length u32, rkey length u32, address bytes, rkey bytes (little-endian).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = GRANT_MAGIC.to_vec();
        for v in [self.endpoint, self.grant, self.slots] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.base_addr.to_le_bytes());
        out.extend_from_slice(&self.slot_bytes.to_le_bytes());
        out.extend_from_slice(&(self.worker_address.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.rkey.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.worker_address);
        out.extend_from_slice(&self.rkey);
        out
    }

    pub fn from_bytes(buf: &[u8]) -> Result<Self, TransportError> {
        let bad = |why: &str| TransportError::Protocol(format!("UCX grant: {why}"));
        let mut r = Reader(buf);
        if r.take(4).ok_or_else(|| bad("short"))? != GRANT_MAGIC {
            return Err(bad("bad magic"));
        }
        let endpoint = r.u32().ok_or_else(|| bad("short"))?;
        let grant = r.u32().ok_or_else(|| bad("short"))?;
        let slots = r.u32().ok_or_else(|| bad("short"))?;
        let base_addr = r.u64().ok_or_else(|| bad("short"))?;
        let slot_bytes = r.u64().ok_or_else(|| bad("short"))?;
        let addr_len = r.u32().ok_or_else(|| bad("short"))? as usize;
        let rkey_len = r.u32().ok_or_else(|| bad("short"))? as usize;
        if addr_len > GRANT_BLOB_MAX || rkey_len > GRANT_BLOB_MAX {
            return Err(bad("address or key too long"));
        }
        if slots == 0
            || slot_bytes
                .checked_mul(slots as u64)
                .is_none_or(|b| b > GRANT_BYTES_MAX)
        {
            return Err(bad("staging region size out of bounds"));
        }
        let worker_address = r.take(addr_len).ok_or_else(|| bad("short"))?.to_vec();
        let rkey = r.take(rkey_len).ok_or_else(|| bad("short"))?.to_vec();
        Ok(Self {
            endpoint,
            grant,
            base_addr,
            slot_bytes,
            slots,
            worker_address,
            rkey,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

fn status_text(status: sys::ucs_status_t) -> String {
    // SAFETY: ucs_status_string returns a pointer to a static NUL-terminated string for any
    // status value.
    unsafe { CStr::from_ptr(sys::ucs_status_string(status)) }
        .to_string_lossy()
        .into_owned()
}

fn check(op: &str, status: sys::ucs_status_t) -> Result<(), TransportError> {
    if status == sys::UCS_OK as sys::ucs_status_t {
        Ok(())
    } else {
        Err(TransportError::Setup(format!(
            "{op}: {}",
            status_text(status)
        )))
    }
}

/// An in-flight UCX request (a non-null, non-error pointer returned by an nbx call).
struct Request(*mut c_void);

/// Result of starting an nbx operation.
fn started(ptr: sys::ucs_status_ptr_t) -> Result<Option<Request>, sys::ucs_status_t> {
    if ptr.is_null() {
        Ok(None)
    } else if sys::ucs_ptr_is_err(ptr) {
        Err(sys::ucs_ptr_status(ptr))
    } else {
        Ok(Some(Request(ptr)))
    }
}

impl Request {
    /// `None` while in progress; once complete the request is freed and its status returned.
    fn poll(&self) -> Option<Result<(), sys::ucs_status_t>> {
        // SAFETY: self.0 is a live request from an nbx call on this thread's worker, not yet
        // freed (it is freed exactly once, below, when it completes).
        let status = unsafe { sys::ucp_request_check_status(self.0) };
        if status == sys::UCS_INPROGRESS as sys::ucs_status_t {
            return None;
        }
        // SAFETY: the request completed; freeing it once is the caller's duty per ucp.h.
        unsafe { sys::ucp_request_free(self.0) };
        Some(if status == sys::UCS_OK as sys::ucs_status_t {
            Ok(())
        } else {
            Err(status)
        })
    }
}

/// One UCX context and worker, owned by a progress thread.
struct Worker {
    context: sys::ucp_context_h,
    worker: sys::ucp_worker_h,
}

impl Worker {
    fn new(tls: Option<&str>) -> Result<Self, TransportError> {
        let mut config: *mut sys::ucp_config_t = std::ptr::null_mut();
        // SAFETY: null prefix/file mean the defaults; config is an out-pointer.
        check("ucp_config_read", unsafe {
            sys::ucp_config_read(std::ptr::null(), std::ptr::null(), &mut config)
        })?;
        let modified = match tls {
            Some(tls) => {
                let value = CString::new(tls)
                    .map_err(|_| TransportError::Setup("UCX TLS contains NUL".into()))?;
                // SAFETY: config came from ucp_config_read; both strings are NUL-terminated.
                check("ucp_config_modify(TLS)", unsafe {
                    sys::ucp_config_modify(config, c"TLS".as_ptr(), value.as_ptr())
                })
            }
            None => Ok(()),
        };
        let params = sys::ucp_params_t {
            field_mask: sys::UCP_PARAM_FIELD_FEATURES as u64,
            features: (sys::UCP_FEATURE_RMA | sys::UCP_FEATURE_AM) as u64,
            ..Default::default()
        };
        let mut context: sys::ucp_context_h = std::ptr::null_mut();
        let init = modified.and_then(|()| {
            // SAFETY: params is initialised for the fields its mask names; config is valid.
            check("ucp_init", unsafe {
                sys::ucp_init(&params, config, &mut context)
            })
        });
        // SAFETY: config came from ucp_config_read and is released once, after ucp_init.
        unsafe { sys::ucp_config_release(config) };
        init?;
        let wparams = sys::ucp_worker_params_t {
            field_mask: sys::UCP_WORKER_PARAM_FIELD_THREAD_MODE as u64,
            thread_mode: sys::UCS_THREAD_MODE_SINGLE,
            ..Default::default()
        };
        let mut worker: sys::ucp_worker_h = std::ptr::null_mut();
        // SAFETY: context is live; worker is an out-pointer.
        if let Err(e) = check("ucp_worker_create", unsafe {
            sys::ucp_worker_create(context, &wparams, &mut worker)
        }) {
            // SAFETY: context was created above and has no workers.
            unsafe { sys::ucp_cleanup(context) };
            return Err(e);
        }
        Ok(Self { context, worker })
    }

    fn progress(&self) -> bool {
        // SAFETY: the worker is live and only this (its owning) thread calls into it.
        unsafe { sys::ucp_worker_progress(self.worker) != 0 }
    }

    fn address(&self) -> Result<Vec<u8>, TransportError> {
        let mut addr: *mut sys::ucp_address_t = std::ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: out-pointers; the worker is live.
        check("ucp_worker_get_address", unsafe {
            sys::ucp_worker_get_address(self.worker, &mut addr, &mut len)
        })?;
        // SAFETY: UCX returned `len` readable bytes at `addr`, released right after the copy.
        let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec();
        // SAFETY: addr came from ucp_worker_get_address on this worker.
        unsafe { sys::ucp_worker_release_address(self.worker, addr) };
        Ok(bytes)
    }

    fn set_am_handler(
        &self,
        id: u32,
        cb: sys::ucp_am_recv_callback_t,
        arg: *mut c_void,
    ) -> Result<(), TransportError> {
        let param = sys::ucp_am_handler_param_t {
            field_mask: (sys::UCP_AM_HANDLER_PARAM_FIELD_ID
                | sys::UCP_AM_HANDLER_PARAM_FIELD_CB
                | sys::UCP_AM_HANDLER_PARAM_FIELD_ARG) as u64,
            id,
            cb,
            arg,
            ..Default::default()
        };
        // SAFETY: the worker is live; `arg` outlives the worker (the caller guarantees it).
        check("ucp_worker_set_am_recv_handler", unsafe {
            sys::ucp_worker_set_am_recv_handler(self.worker, &param)
        })
    }

    /// Sends a small active message; the buffer must live until the returned request completes.
    fn am_send(
        &self,
        ep: sys::ucp_ep_h,
        id: u32,
        buf: &[u8],
        reply: bool,
    ) -> Result<Option<Request>, sys::ucs_status_t> {
        let mut flags = sys::UCP_AM_SEND_FLAG_EAGER;
        if reply {
            flags |= sys::UCP_AM_SEND_FLAG_REPLY;
        }
        let param = sys::ucp_request_param_t {
            op_attr_mask: sys::UCP_OP_ATTR_FIELD_FLAGS,
            flags,
            ..Default::default()
        };
        // SAFETY: ep belongs to this worker; buf stays alive until the request completes (the
        // caller keeps it next to the request).
        started(unsafe {
            sys::ucp_am_send_nbx(
                ep,
                id,
                std::ptr::null(),
                0,
                buf.as_ptr() as *const c_void,
                buf.len(),
                &param,
            )
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // SAFETY: every endpoint, mapping and request of this worker was released before (the
        // progress threads do so before dropping the Worker); destroy then clean up, once.
        unsafe {
            sys::ucp_worker_destroy(self.worker);
            sys::ucp_cleanup(self.context);
        }
    }
}

/// A progress thread with its stop flag; dropping it stops and joins the thread.
struct ProgressThread<C> {
    commands: std_mpsc::Sender<C>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl<C> ProgressThread<C> {
    fn command(&self, cmd: C) -> Result<(), TransportError> {
        self.commands
            .send(cmd)
            .map_err(|_| TransportError::Setup("UCX progress thread has stopped".into()))?;
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
        Ok(())
    }
}

impl<C> Drop for ProgressThread<C> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// Runs `body` on a new thread after `init` built its state there; returns once init is done.
fn spawn_progress<C: Send + 'static, S: 'static>(
    name: &str,
    init: impl FnOnce() -> Result<S, TransportError> + Send + 'static,
    mut step: impl FnMut(&mut S, Option<C>) -> bool + Send + 'static,
    finish: impl FnOnce(S) + Send + 'static,
) -> Result<ProgressThread<C>, TransportError> {
    let (tx, rx) = std_mpsc::channel::<C>();
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std_mpsc::channel();
    let stop_flag = stop.clone();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let mut state = match init() {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let mut last_active = Instant::now();
            while !stop_flag.load(Ordering::Acquire) {
                let mut active = false;
                while let Ok(cmd) = rx.try_recv() {
                    step(&mut state, Some(cmd));
                    active = true;
                }
                active |= step(&mut state, None);
                if active {
                    last_active = Instant::now();
                } else if last_active.elapsed() > PROGRESS_SPIN {
                    std::thread::park_timeout(PROGRESS_IDLE_POLL);
                } else {
                    std::thread::yield_now();
                }
            }
            finish(state);
        })
        .map_err(|e| TransportError::Setup(format!("spawn UCX progress thread: {e}")))?;
    let ready = ready_rx
        .recv()
        .map_err(|_| TransportError::Setup("UCX progress thread died during setup".into()));
    let pt = ProgressThread {
        commands: tx,
        stop,
        thread: Some(thread),
    };
    ready??;
    Ok(pt)
}

// ------------------------------------------------------------------------------------------
// Receiver

type InboxTx = mpsc::Sender<Result<KvFrame, TransportError>>;

enum RecvCmd {
    Bind(EndpointId, InboxTx),
    Unbind(EndpointId),
    Grant(
        EndpointId,
        oneshot::Sender<Result<UcxGrant, TransportError>>,
    ),
}

/// A frame notice as parsed in the AM handler.
struct Notice {
    grant: u32,
    slot: u32,
    token: u32,
    header: FrameHeader,
    pages: Vec<u32>,
    crcs: Vec<u32>,
    reply_ep: sys::ucp_ep_h,
}

struct Staging {
    endpoint: EndpointId,
    memh: sys::ucp_mem_h,
    base: *mut u8,
    slot_bytes: usize,
    slots: u32,
    busy: Vec<bool>,
    queue: VecDeque<Notice>,
}

struct RecvState {
    worker: Worker,
    address: Vec<u8>,
    cfg: UcxConfig,
    inboxes: BTreeMap<EndpointId, InboxTx>,
    grants: BTreeMap<u32, Staging>,
    next_grant: u32,
    /// Filled by the AM handler during `ucp_worker_progress`. Boxed: UCX holds the address of
    /// the Vec itself, which must not move with the state.
    #[allow(clippy::box_collection)]
    arrived: Box<Vec<Notice>>,
    replies: Vec<(Request, Box<[u8; REPLY_LEN]>)>,
}

/// The AM handler for frame notices. Runs inside `ucp_worker_progress` on the progress thread.
unsafe extern "C" fn on_notice(
    arg: *mut c_void,
    _header: *const c_void,
    _header_length: usize,
    data: *mut c_void,
    length: usize,
    param: *const sys::ucp_am_recv_param_t,
) -> sys::ucs_status_t {
    // SAFETY: arg is the RecvState's `arrived` vector, registered by this thread and alive
    // until the worker is destroyed; param is valid for this call per ucp.h.
    let (arrived, param) = unsafe { (&mut *(arg as *mut Vec<Notice>), &*param) };
    let rndv = param.recv_attr & sys::UCP_AM_RECV_ATTR_FLAG_RNDV as u64 != 0;
    let has_reply = param.recv_attr & sys::UCP_AM_RECV_ATTR_FIELD_REPLY_EP as u64 != 0;
    if rndv || !has_reply || data.is_null() {
        // Senders always use eager notices with a reply endpoint; anything else is dropped.
        return sys::UCS_OK as sys::ucs_status_t;
    }
    // SAFETY: for an eager message UCX passes `length` readable bytes at `data` for the
    // duration of this call; they are parsed (copied) before returning.
    let buf = unsafe { std::slice::from_raw_parts(data as *const u8, length) };
    if let Some(notice) = parse_notice(buf, param.reply_ep) {
        arrived.push(notice);
    }
    sys::UCS_OK as sys::ucs_status_t
}

fn parse_notice(buf: &[u8], reply_ep: sys::ucp_ep_h) -> Option<Notice> {
    let mut r = Reader(buf);
    let grant = r.u32()?;
    let slot = r.u32()?;
    let token = r.u32()?;
    let _reserved = r.u32()?;
    let header = FrameHeader::decode(r.0).ok()?;
    let (pages, crcs) = wire::decode_index(&header, &r.0[HEADER_LEN..]).ok()?;
    Some(Notice {
        grant,
        slot,
        token,
        header,
        pages,
        crcs,
        reply_ep,
    })
}

impl RecvState {
    fn init(cfg: UcxConfig) -> Result<Self, TransportError> {
        let worker = Worker::new(cfg.tls.as_deref())?;
        let address = worker.address()?;
        let mut state = Self {
            worker,
            address,
            cfg,
            inboxes: BTreeMap::new(),
            grants: BTreeMap::new(),
            next_grant: 1,
            arrived: Box::default(),
            replies: Vec::new(),
        };
        let arg = &mut *state.arrived as *mut Vec<Notice> as *mut c_void;
        state
            .worker
            .set_am_handler(AM_NOTICE, Some(on_notice), arg)?;
        Ok(state)
    }

    fn step(&mut self, cmd: Option<RecvCmd>) -> bool {
        match cmd {
            Some(RecvCmd::Bind(ep, tx)) => {
                self.inboxes.insert(ep, tx);
                return true;
            }
            Some(RecvCmd::Unbind(ep)) => {
                self.inboxes.remove(&ep);
                let gone: Vec<u32> = self
                    .grants
                    .iter()
                    .filter(|(_, s)| s.endpoint == ep)
                    .map(|(&g, _)| g)
                    .collect();
                for g in gone {
                    if let Some(s) = self.grants.remove(&g) {
                        self.unmap(s);
                    }
                }
                return true;
            }
            Some(RecvCmd::Grant(ep, reply)) => {
                let _ = reply.send(self.grant(ep));
                return true;
            }
            None => {}
        }
        let mut active = self.worker.progress();
        for notice in self.arrived.drain(..) {
            active = true;
            let Some(s) = self.grants.get_mut(&notice.grant) else {
                let reply = reply_bytes(REPLY_UNKNOWN, &notice);
                send_reply(&self.worker, &mut self.replies, notice.reply_ep, reply);
                continue;
            };
            let slot = notice.slot as usize;
            // Each notice must hold a distinct granted slot, and fit it: that bounds the queue
            // at `slots` and keeps every copy inside the mapping.
            if slot >= s.busy.len() || s.busy[slot] || notice.header.bytes > s.slot_bytes {
                let reply = reply_bytes(REPLY_PROTOCOL, &notice);
                send_reply(&self.worker, &mut self.replies, notice.reply_ep, reply);
                continue;
            }
            s.busy[slot] = true;
            s.queue.push_back(notice);
        }
        active |= self.deliver();
        self.replies.retain(|(req, _)| req.poll().is_none());
        active | !self.replies.is_empty()
    }

    /// Moves queued frames into their inboxes while they have room, answering each.
    fn deliver(&mut self) -> bool {
        let mut active = false;
        for s in self.grants.values_mut() {
            while let Some(notice) = s.queue.front() {
                let reply_kind = match self.inboxes.get(&s.endpoint) {
                    None => REPLY_UNKNOWN,
                    Some(tx) => match tx.try_reserve() {
                        Ok(permit) => {
                            // SAFETY: slot < slots and bytes <= slot_bytes were checked when the
                            // notice was queued, so the range lies inside the mapped region. The
                            // sender wrote it and flushed before the notice, and will not write
                            // the slot again before our credit.
                            let bytes = unsafe {
                                std::slice::from_raw_parts(
                                    s.base.add(notice.slot as usize * s.slot_bytes),
                                    notice.header.bytes,
                                )
                            }
                            .to_vec();
                            permit.send(verified(KvFrame {
                                seq: notice.header.seq,
                                layer: notice.header.layer,
                                layout: notice.header.layout,
                                pages: notice.pages.clone(),
                                page_crc32: notice.crcs.clone(),
                                bytes,
                            }));
                            REPLY_CREDIT
                        }
                        Err(mpsc::error::TrySendError::Full(())) => break,
                        Err(mpsc::error::TrySendError::Closed(())) => REPLY_CLOSED,
                    },
                };
                let Some(notice) = s.queue.pop_front() else {
                    break;
                };
                s.busy[notice.slot as usize] = false;
                let reply = reply_bytes(reply_kind, &notice);
                send_reply(&self.worker, &mut self.replies, notice.reply_ep, reply);
                active = true;
            }
        }
        active
    }

    fn grant(&mut self, ep: EndpointId) -> Result<UcxGrant, TransportError> {
        if !self.inboxes.contains_key(&ep) {
            return Err(TransportError::UnknownEndpoint(ep));
        }
        let slots = self.cfg.slots;
        let length = self
            .cfg
            .slot_bytes
            .checked_mul(slots as usize)
            .filter(|&l| l > 0 && l as u64 <= GRANT_BYTES_MAX)
            .ok_or_else(|| TransportError::Setup("UCX staging size out of bounds".into()))?;
        let params = sys::ucp_mem_map_params_t {
            field_mask: (sys::UCP_MEM_MAP_PARAM_FIELD_ADDRESS
                | sys::UCP_MEM_MAP_PARAM_FIELD_LENGTH
                | sys::UCP_MEM_MAP_PARAM_FIELD_FLAGS) as u64,
            address: std::ptr::null_mut(),
            length,
            flags: sys::UCP_MEM_MAP_ALLOCATE,
            ..Default::default()
        };
        let mut memh: sys::ucp_mem_h = std::ptr::null_mut();
        // SAFETY: the context is live; UCX allocates `length` bytes (ALLOCATE, null address).
        check("ucp_mem_map", unsafe {
            sys::ucp_mem_map(self.worker.context, &params, &mut memh)
        })?;
        let staging = Staging {
            endpoint: ep,
            memh,
            base: std::ptr::null_mut(),
            slot_bytes: self.cfg.slot_bytes,
            slots,
            busy: vec![false; slots as usize],
            queue: VecDeque::new(),
        };
        match self.describe(staging) {
            Ok((staging, grant)) => {
                self.grants.insert(grant.grant, staging);
                Ok(grant)
            }
            Err((staging, e)) => {
                self.unmap(staging);
                Err(e)
            }
        }
    }

    #[allow(clippy::result_large_err)]
    fn describe(
        &mut self,
        mut s: Staging,
    ) -> Result<(Staging, UcxGrant), (Staging, TransportError)> {
        let mut attr = sys::ucp_mem_attr_t {
            field_mask: (sys::UCP_MEM_ATTR_FIELD_ADDRESS | sys::UCP_MEM_ATTR_FIELD_LENGTH) as u64,
            ..Default::default()
        };
        // SAFETY: memh is a live mapping of this context.
        if let Err(e) = check("ucp_mem_query", unsafe {
            sys::ucp_mem_query(s.memh, &mut attr)
        }) {
            return Err((s, e));
        }
        if attr.length < s.slot_bytes * s.slots as usize {
            return Err((
                s,
                TransportError::Setup("ucp_mem_map returned a short region".into()),
            ));
        }
        s.base = attr.address as *mut u8;
        let mut buf: *mut c_void = std::ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: context and memh are live; buf/len are out-pointers.
        if let Err(e) = check("ucp_rkey_pack", unsafe {
            sys::ucp_rkey_pack(self.worker.context, s.memh, &mut buf, &mut len)
        }) {
            return Err((s, e));
        }
        // SAFETY: ucp_rkey_pack returned `len` bytes at `buf`, released right after the copy.
        let rkey = unsafe { std::slice::from_raw_parts(buf as *const u8, len) }.to_vec();
        // SAFETY: buf came from ucp_rkey_pack and is released once.
        unsafe { sys::ucp_rkey_buffer_release(buf) };
        let grant = self.next_grant;
        self.next_grant = self.next_grant.wrapping_add(1).max(1);
        let g = UcxGrant {
            endpoint: s.endpoint,
            grant,
            base_addr: s.base as u64,
            slot_bytes: s.slot_bytes as u64,
            slots: s.slots,
            worker_address: self.address.clone(),
            rkey,
        };
        Ok((s, g))
    }

    fn unmap(&self, s: Staging) {
        // SAFETY: memh is a live mapping of this context, unmapped once (its Staging is
        // consumed). Notices still naming this grant are answered `unknown` from now on.
        unsafe { sys::ucp_mem_unmap(self.worker.context, s.memh) };
    }

    fn finish(mut self) {
        for _ in 0..STOP_DRAIN_ITERATIONS {
            self.worker.progress();
            self.replies.retain(|(req, _)| req.poll().is_none());
            if self.replies.is_empty() {
                break;
            }
        }
        for (_, s) in std::mem::take(&mut self.grants) {
            self.unmap(s);
        }
        // Requests that never finished are abandoned: ucp_worker_destroy releases them.
        std::mem::forget(std::mem::take(&mut self.replies));
    }
}

fn reply_bytes(kind: u8, n: &Notice) -> [u8; REPLY_LEN] {
    let mut out = [0u8; REPLY_LEN];
    out[0] = kind;
    out[4..8].copy_from_slice(&n.grant.to_le_bytes());
    out[8..12].copy_from_slice(&n.slot.to_le_bytes());
    out[12..16].copy_from_slice(&n.token.to_le_bytes());
    out
}

fn send_reply(
    worker: &Worker,
    replies: &mut Vec<(Request, Box<[u8; REPLY_LEN]>)>,
    ep: sys::ucp_ep_h,
    bytes: [u8; REPLY_LEN],
) {
    let buf = Box::new(bytes);
    // A failed reply leaves the sender without that credit; its sends then wait, which is the
    // safe failure (nothing is overwritten).
    if let Ok(Some(req)) = worker.am_send(ep, AM_REPLY, &buf[..], false) {
        replies.push((req, buf));
    }
}

/// The receiving side: a UCX worker hosting KV endpoints, each with staging regions for its
/// senders.
pub struct UcxKvServer {
    thread: ProgressThread<RecvCmd>,
}

impl std::fmt::Debug for UcxKvServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UcxKvServer").finish_non_exhaustive()
    }
}

impl UcxKvServer {
    pub fn start(cfg: UcxConfig) -> Result<Self, TransportError> {
        let thread = spawn_progress(
            "duet-ucx-recv",
            move || RecvState::init(cfg),
            RecvState::step,
            RecvState::finish,
        )?;
        Ok(Self { thread })
    }

    /// Binds (or rebinds) an endpoint; its frames arrive on the inbox.
    pub fn bind(&self, ep: EndpointId) -> Result<KvInbox, TransportError> {
        let (tx, inbox) = KvInbox::channel();
        self.thread.command(RecvCmd::Bind(ep, tx))?;
        Ok(inbox)
    }

    /// Unbinds an endpoint and unmaps its staging regions.
    pub fn unbind(&self, ep: EndpointId) -> Result<(), TransportError> {
        self.thread.command(RecvCmd::Unbind(ep))
    }

    /// A new staging region for one sender of `ep`, to hand to that sender out of band.
    pub async fn grant(&self, ep: EndpointId) -> Result<UcxGrant, TransportError> {
        let (tx, rx) = oneshot::channel();
        self.thread.command(RecvCmd::Grant(ep, tx))?;
        rx.await
            .map_err(|_| TransportError::Setup("UCX progress thread has stopped".into()))?
    }
}

// ------------------------------------------------------------------------------------------
// Sender

type Reply = oneshot::Sender<Result<(), TransportError>>;

enum SendCmd {
    Connect(EndpointId, UcxGrant, Arc<DestShared>, Reply),
    Frame(EndpointId, u32, KvFrame, Reply),
    Disconnect(EndpointId),
}

/// What the async side and the progress thread share about one destination.
struct DestShared {
    /// Set once the receiver refused a frame; every later send fails with it.
    failed: Mutex<Option<TransportError>>,
    credits: mpsc::Sender<u32>,
}

struct DestHandle {
    shared: Arc<DestShared>,
    /// Free slots; held across "take a slot, queue the frame" so frames keep their order.
    credits: tokio::sync::Mutex<mpsc::Receiver<u32>>,
    slot_bytes: usize,
}

struct Op {
    slot: u32,
    frame: KvFrame,
    notice: Vec<u8>,
    step: u8,
    request: Option<Request>,
    reply: Reply,
}

const STEP_PUT: u8 = 0;
const STEP_FLUSH: u8 = 1;
const STEP_NOTICE: u8 = 2;
const STEP_DONE: u8 = 3;

struct Dest {
    ep: sys::ucp_ep_h,
    rkey: sys::ucp_rkey_h,
    grant: UcxGrant,
    shared: Arc<DestShared>,
    ops: VecDeque<Op>,
}

struct SendState {
    worker: Worker,
    dests: BTreeMap<EndpointId, Dest>,
    /// As `RecvState::arrived`: UCX holds this Vec's address.
    #[allow(clippy::box_collection)]
    arrived: Box<Vec<[u8; REPLY_LEN]>>,
}

/// The AM handler for credits and refusals. Runs inside `ucp_worker_progress`.
unsafe extern "C" fn on_reply(
    arg: *mut c_void,
    _header: *const c_void,
    _header_length: usize,
    data: *mut c_void,
    length: usize,
    param: *const sys::ucp_am_recv_param_t,
) -> sys::ucs_status_t {
    // SAFETY: arg is the SendState's `arrived` vector, alive until the worker is destroyed;
    // param is valid for this call.
    let (arrived, param) = unsafe { (&mut *(arg as *mut Vec<[u8; REPLY_LEN]>), &*param) };
    let rndv = param.recv_attr & sys::UCP_AM_RECV_ATTR_FLAG_RNDV as u64 != 0;
    if !rndv && !data.is_null() && length == REPLY_LEN {
        // SAFETY: eager data: `length` readable bytes for the duration of this call.
        let buf = unsafe { std::slice::from_raw_parts(data as *const u8, length) };
        let mut reply = [0u8; REPLY_LEN];
        reply.copy_from_slice(buf);
        arrived.push(reply);
    }
    sys::UCS_OK as sys::ucs_status_t
}

impl SendState {
    fn init(tls: Option<String>) -> Result<Self, TransportError> {
        let worker = Worker::new(tls.as_deref())?;
        let mut state = Self {
            worker,
            dests: BTreeMap::new(),
            arrived: Box::default(),
        };
        let arg = &mut *state.arrived as *mut Vec<[u8; REPLY_LEN]> as *mut c_void;
        state.worker.set_am_handler(AM_REPLY, Some(on_reply), arg)?;
        Ok(state)
    }

    fn step(&mut self, cmd: Option<SendCmd>) -> bool {
        match cmd {
            Some(SendCmd::Connect(dest, grant, shared, reply)) => {
                let _ = reply.send(self.connect(dest, grant, shared));
                return true;
            }
            Some(SendCmd::Frame(dest, slot, frame, reply)) => {
                let Some(d) = self.dests.get_mut(&dest) else {
                    let _ = reply.send(Err(TransportError::UnknownEndpoint(dest)));
                    return true;
                };
                let notice = encode_notice(&d.grant, slot, dest, &frame);
                d.ops.push_back(Op {
                    slot,
                    frame,
                    notice,
                    step: STEP_PUT,
                    request: None,
                    reply,
                });
                return true;
            }
            Some(SendCmd::Disconnect(dest)) => {
                if let Some(d) = self.dests.remove(&dest) {
                    self.close(d);
                }
                return true;
            }
            None => {}
        }
        let mut active = self.worker.progress();
        for reply in self.arrived.drain(..) {
            active = true;
            let token = u32::from_le_bytes([reply[12], reply[13], reply[14], reply[15]]);
            let slot = u32::from_le_bytes([reply[8], reply[9], reply[10], reply[11]]);
            let Some(d) = self.dests.get(&token) else {
                continue;
            };
            let failure = match reply[0] {
                REPLY_CREDIT => None,
                REPLY_CLOSED => Some(TransportError::Closed(token)),
                REPLY_UNKNOWN => Some(TransportError::UnknownEndpoint(token)),
                _ => Some(TransportError::Protocol(format!(
                    "endpoint {token} refused a frame notice"
                ))),
            };
            if let Some(e) = failure {
                let mut f = d.shared.failed.lock().unwrap_or_else(|e| e.into_inner());
                f.get_or_insert(e);
            }
            // The slot is free either way; returning it also wakes a sender waiting for
            // credit, which then sees the failure.
            let _ = d.shared.credits.try_send(slot);
        }
        for d in self.dests.values_mut() {
            active |= advance(&self.worker, d);
        }
        active
    }

    fn connect(
        &mut self,
        dest: EndpointId,
        grant: UcxGrant,
        shared: Arc<DestShared>,
    ) -> Result<(), TransportError> {
        if let Some(old) = self.dests.remove(&dest) {
            self.close(old);
        }
        let params = sys::ucp_ep_params_t {
            field_mask: sys::UCP_EP_PARAM_FIELD_REMOTE_ADDRESS as u64,
            address: grant.worker_address.as_ptr() as *const sys::ucp_address_t,
            ..Default::default()
        };
        let mut ep: sys::ucp_ep_h = std::ptr::null_mut();
        // SAFETY: the worker is live; the address bytes came from ucp_worker_get_address on the
        // receiver (UCX validates the packed address and fails on garbage).
        check("ucp_ep_create", unsafe {
            sys::ucp_ep_create(self.worker.worker, &params, &mut ep)
        })?;
        let mut rkey: sys::ucp_rkey_h = std::ptr::null_mut();
        // SAFETY: ep is live; the key bytes came from ucp_rkey_pack on the receiver.
        let unpacked = check("ucp_ep_rkey_unpack", unsafe {
            sys::ucp_ep_rkey_unpack(ep, grant.rkey.as_ptr() as *const c_void, &mut rkey)
        });
        let d = Dest {
            ep,
            rkey,
            grant,
            shared,
            ops: VecDeque::new(),
        };
        if let Err(e) = unpacked {
            self.close(d);
            return Err(e);
        }
        // Flushing the new endpoint completes its wire-up before the first frame; it also keeps
        // an endpoint from being torn down mid wire-up, which UCX 1.13's tcp transport does not
        // survive (an assertion in uct_tcp_ep_pending_purge aborts the process).
        let param = sys::ucp_request_param_t::default();
        // SAFETY: d.ep is live.
        let flushed = match started(unsafe { sys::ucp_ep_flush_nbx(d.ep, &param) }) {
            Ok(None) => Ok(()),
            Ok(Some(req)) => wait(&self.worker, req, CONNECT_TIMEOUT),
            Err(status) => Err(status),
        };
        if let Err(status) = flushed {
            self.close(d);
            return Err(TransportError::Connect {
                dest,
                detail: format!("UCX endpoint wire-up: {}", status_text(status)),
            });
        }
        self.dests.insert(dest, d);
        Ok(())
    }

    fn close(&self, mut d: Dest) {
        for op in d.ops.drain(..) {
            let _ = op.reply.send(Err(TransportError::Closed(d.grant.endpoint)));
            if let Some(req) = op.request {
                drain(&self.worker, req);
            }
        }
        if !d.rkey.is_null() {
            // SAFETY: rkey came from ucp_ep_rkey_unpack on d.ep, destroyed once before the ep.
            unsafe { sys::ucp_rkey_destroy(d.rkey) };
        }
        let param = sys::ucp_request_param_t {
            op_attr_mask: sys::UCP_OP_ATTR_FIELD_FLAGS,
            flags: sys::UCP_EP_CLOSE_FLAG_FORCE,
            ..Default::default()
        };
        // SAFETY: d.ep is a live endpoint of this worker, closed once.
        if let Ok(Some(req)) = started(unsafe { sys::ucp_ep_close_nbx(d.ep, &param) }) {
            drain(&self.worker, req);
        }
    }

    fn finish(mut self) {
        for (_, d) in std::mem::take(&mut self.dests) {
            self.close(d);
        }
    }
}

/// Waits for endpoint wire-up (connect) at most this long (10 s, as QUIC's connect).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Progresses the worker until `req` completes or `limit` passes (then the request is left to
/// ucp_worker_destroy, and the caller closes the endpoint).
fn wait(worker: &Worker, req: Request, limit: Duration) -> Result<(), sys::ucs_status_t> {
    let start = Instant::now();
    loop {
        if let Some(done) = req.poll() {
            return done;
        }
        if start.elapsed() > limit {
            // The request is abandoned, not freed: UCX may still complete it.
            let _ = req;
            return Err(sys::UCS_ERR_TIMED_OUT as sys::ucs_status_t);
        }
        worker.progress();
    }
}

/// Progresses the worker until `req` completes (bounded by [`STOP_DRAIN_ITERATIONS`]).
fn drain(worker: &Worker, req: Request) {
    for _ in 0..STOP_DRAIN_ITERATIONS {
        if req.poll().is_some() {
            return;
        }
        worker.progress();
    }
    // Abandoned: ucp_worker_destroy releases outstanding requests.
}

fn encode_notice(grant: &UcxGrant, slot: u32, token: u32, frame: &KvFrame) -> Vec<u8> {
    let mut out = Vec::with_capacity(NOTICE_PREFIX_LEN + HEADER_LEN + frame.pages.len() * 8);
    for v in [grant.grant, slot, token, 0] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    // The frame passed FrameHeader::of in send(), so this cannot fail; an empty notice would be
    // dropped by the receiver rather than misread.
    if let Ok(prefix) = wire::encode_prefix(frame) {
        out.extend_from_slice(&prefix);
    }
    out
}

/// Moves the destination's head frame through put → flush → notice, as far as UCX allows now.
fn advance(worker: &Worker, d: &mut Dest) -> bool {
    let mut active = false;
    while let Some(op) = d.ops.front_mut() {
        if let Some(req) = &op.request {
            match req.poll() {
                None => return true,
                Some(Ok(())) => {
                    op.request = None;
                    op.step += 1;
                }
                Some(Err(status)) => {
                    op.request = None;
                    fail_head(d, status);
                    active = true;
                    continue;
                }
            }
        }
        active = true;
        let issued = match op.step {
            STEP_PUT if op.frame.bytes.is_empty() => Ok(None),
            STEP_PUT => {
                let remote = d.grant.base_addr + op.slot as u64 * d.grant.slot_bytes;
                let param = sys::ucp_request_param_t::default();
                // SAFETY: ep and rkey are live; the source bytes stay in `op` until the put
                // completes; slot < slots and len <= slot_bytes (checked in send) keep the
                // target inside the granted region.
                started(unsafe {
                    sys::ucp_put_nbx(
                        d.ep,
                        op.frame.bytes.as_ptr() as *const c_void,
                        op.frame.bytes.len(),
                        remote,
                        d.rkey,
                        &param,
                    )
                })
            }
            STEP_FLUSH => {
                let param = sys::ucp_request_param_t::default();
                // SAFETY: ep is live.
                started(unsafe { sys::ucp_ep_flush_nbx(d.ep, &param) })
            }
            STEP_NOTICE => worker.am_send(d.ep, AM_NOTICE, &op.notice, true),
            _ => {
                if let Some(op) = d.ops.pop_front() {
                    let _ = op.reply.send(Ok(()));
                }
                continue;
            }
        };
        match issued {
            Ok(None) => op.step += 1,
            Ok(Some(req)) => op.request = Some(req),
            Err(status) => fail_head(d, status),
        }
        if op_done(d)
            && let Some(op) = d.ops.pop_front()
        {
            let _ = op.reply.send(Ok(()));
        }
    }
    active
}

fn op_done(d: &Dest) -> bool {
    d.ops
        .front()
        .is_some_and(|op| op.step >= STEP_DONE && op.request.is_none())
}

fn fail_head(d: &mut Dest, status: sys::ucs_status_t) {
    let dest = d.grant.endpoint;
    if let Some(op) = d.ops.pop_front() {
        let _ = op.reply.send(Err(TransportError::Connect {
            dest,
            detail: format!("UCX: {}", status_text(status)),
        }));
        // The slot was never announced, so it is free again.
        let _ = d.shared.credits.try_send(op.slot);
    }
}

/// The sending side: a UCX worker with an endpoint per destination it was granted.
pub struct UcxTransport {
    thread: ProgressThread<SendCmd>,
    dests: Mutex<BTreeMap<EndpointId, Arc<DestHandle>>>,
}

impl std::fmt::Debug for UcxTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UcxTransport").finish_non_exhaustive()
    }
}

impl UcxTransport {
    /// A sender with its own UCX context; `tls` as in [`UcxConfig::tls`].
    pub fn start(tls: Option<String>) -> Result<Self, TransportError> {
        let thread = spawn_progress(
            "duet-ucx-send",
            move || SendState::init(tls),
            SendState::step,
            SendState::finish,
        )?;
        Ok(Self {
            thread,
            dests: Mutex::default(),
        })
    }

    /// Routes frames for `dest` into the staging region `grant` describes.
    pub async fn connect(&self, dest: EndpointId, grant: UcxGrant) -> Result<(), TransportError> {
        let (credit_tx, credit_rx) = mpsc::channel(grant.slots as usize);
        for slot in 0..grant.slots {
            let _ = credit_tx.try_send(slot);
        }
        let shared = Arc::new(DestShared {
            failed: Mutex::new(None),
            credits: credit_tx,
        });
        let handle = Arc::new(DestHandle {
            shared: shared.clone(),
            credits: tokio::sync::Mutex::new(credit_rx),
            slot_bytes: usize::try_from(grant.slot_bytes).unwrap_or(usize::MAX),
        });
        let (tx, rx) = oneshot::channel();
        self.thread
            .command(SendCmd::Connect(dest, grant, shared, tx))?;
        rx.await
            .map_err(|_| TransportError::Setup("UCX progress thread has stopped".into()))??;
        self.dests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dest, handle);
        Ok(())
    }

    pub fn disconnect(&self, dest: EndpointId) -> Result<(), TransportError> {
        self.dests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&dest);
        self.thread.command(SendCmd::Disconnect(dest))
    }

    async fn send_frame(&self, dest: EndpointId, frame: KvFrame) -> Result<(), TransportError> {
        FrameHeader::of(&frame)?;
        let d = self
            .dests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&dest)
            .cloned()
            .ok_or(TransportError::UnknownEndpoint(dest))?;
        if frame.bytes.len() > d.slot_bytes {
            return Err(TransportError::FrameTooLarge {
                bytes: frame.bytes.len(),
                max: d.slot_bytes,
            });
        }
        let failed = || {
            d.shared
                .failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        };
        let rx = {
            let mut credits = d.credits.lock().await;
            if let Some(e) = failed() {
                return Err(e);
            }
            let slot = credits.recv().await.ok_or(TransportError::Closed(dest))?;
            if let Some(e) = failed() {
                let _ = d.shared.credits.try_send(slot);
                return Err(e);
            }
            let (tx, rx) = oneshot::channel();
            self.thread.command(SendCmd::Frame(dest, slot, frame, tx))?;
            rx
        };
        rx.await
            .map_err(|_| TransportError::Setup("UCX progress thread has stopped".into()))?
    }
}

impl KvTransport for UcxTransport {
    fn send(&self, dest: EndpointId, frame: KvFrame) -> SendFuture<'_> {
        Box::pin(self.send_frame(dest, frame))
    }

    fn name(&self) -> &'static str {
        "ucx"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_round_trips_and_rejects_garbage() {
        let g = UcxGrant {
            endpoint: 3,
            grant: 7,
            base_addr: 0x7f00_0000_0000,
            slot_bytes: 1 << 20,
            slots: 4,
            worker_address: vec![1, 2, 3],
            rkey: vec![9; 40],
        };
        let bytes = g.to_bytes();
        assert_eq!(UcxGrant::from_bytes(&bytes).unwrap(), g);
        for n in 0..bytes.len() {
            assert!(UcxGrant::from_bytes(&bytes[..n]).is_err());
        }
        let mut huge = g.clone();
        huge.slot_bytes = u64::MAX;
        assert!(UcxGrant::from_bytes(&huge.to_bytes()).is_err());
    }

    #[test]
    fn notices_parse_or_are_dropped() {
        let frame = KvFrame::new(5, 1, crate::test_layout(), vec![2, 3], vec![7; 32]);
        let g = UcxGrant {
            endpoint: 1,
            grant: 9,
            base_addr: 0,
            slot_bytes: 64,
            slots: 2,
            worker_address: vec![],
            rkey: vec![],
        };
        let n = encode_notice(&g, 1, 42, &frame);
        let p = parse_notice(&n, std::ptr::null_mut()).unwrap();
        assert_eq!((p.grant, p.slot, p.token, p.header.bytes), (9, 1, 42, 32));
        assert_eq!(
            (p.pages, p.crcs),
            (frame.pages.clone(), frame.page_crc32.clone())
        );
        for cut in 0..n.len() {
            assert!(parse_notice(&n[..cut], std::ptr::null_mut()).is_none());
        }
    }
}
