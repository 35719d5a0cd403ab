//! A worker process's KV data plane: QUIC, or UCX where duet was built with `--features ucx`.
//!
//! Both need something out of band, carried by the control plane: QUIC the decode process's
//! address (in its hello), UCX a *grant* — the staging region's address, size and packed remote
//! key, made by the decode process for each prefill worker that sends to it. Decode attaches the
//! grant to the first job it forwards to a prefill worker; the prefill process connects with it
//! before the job's first frame. Grants only travel over the authenticated control connection,
//! so a process without the cluster secret never learns where to write.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use duet_transport::quic::{ClusterSecret, QuicKvServer, QuicTransport};
use duet_transport::{InProcTransport, KvInbox, KvTransport, TransportError};

/// Which KV transport the processes of a cluster use (all must agree; the gateway checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataKind {
    Quic,
    /// `tls` as UCX's `UCX_TLS` (`None`: UCX's own choice: RDMA where there is a fabric).
    Ucx {
        tls: Option<String>,
    },
}

impl DataKind {
    pub fn name(&self) -> &'static str {
        match self {
            DataKind::Quic => "quic",
            DataKind::Ucx { .. } => "ucx",
        }
    }
}

enum Plane {
    QuicRecv(Arc<QuicKvServer>),
    QuicSend(Arc<QuicTransport>),
    #[cfg(feature = "ucx")]
    UcxRecv(Arc<duet_transport::ucx::UcxKvServer>),
    #[cfg(feature = "ucx")]
    UcxSend(Arc<duet_transport::ucx::UcxTransport>),
}

/// One process's data plane.
pub struct DataPlane {
    plane: Plane,
    /// Decode: (endpoint, prefill worker) pairs already granted.
    granted: Mutex<BTreeSet<(u32, u32)>>,
    /// Prefill: endpoints already connected.
    connected: Mutex<BTreeSet<u32>>,
}

impl DataPlane {
    pub fn kind_name(&self) -> &'static str {
        match self.plane {
            Plane::QuicRecv(_) | Plane::QuicSend(_) => "quic",
            #[cfg(feature = "ucx")]
            Plane::UcxRecv(_) | Plane::UcxSend(_) => "ucx",
        }
    }

    /// A decode process's receiving side on `bind` (QUIC) or UCX's own addresses.
    pub fn receiver(
        kind: &DataKind,
        bind: SocketAddr,
        secret: ClusterSecret,
    ) -> Result<Self, TransportError> {
        let plane = match kind {
            DataKind::Quic => Plane::QuicRecv(Arc::new(QuicKvServer::listen(bind, secret)?)),
            #[cfg(feature = "ucx")]
            DataKind::Ucx { tls } => {
                let cfg = duet_transport::ucx::UcxConfig {
                    tls: tls.clone(),
                    ..Default::default()
                };
                Plane::UcxRecv(Arc::new(duet_transport::ucx::UcxKvServer::start(cfg)?))
            }
            #[cfg(not(feature = "ucx"))]
            DataKind::Ucx { .. } => return Err(no_ucx()),
        };
        Ok(Self::of(plane))
    }

    /// A prefill process's sending side.
    pub fn sender(
        kind: &DataKind,
        local: SocketAddr,
        secret: ClusterSecret,
    ) -> Result<Self, TransportError> {
        let plane = match kind {
            DataKind::Quic => Plane::QuicSend(Arc::new(QuicTransport::new(local, secret)?)),
            #[cfg(feature = "ucx")]
            DataKind::Ucx { tls } => Plane::UcxSend(Arc::new(
                duet_transport::ucx::UcxTransport::start(tls.clone())?,
            )),
            #[cfg(not(feature = "ucx"))]
            DataKind::Ucx { .. } => return Err(no_ucx()),
        };
        Ok(Self::of(plane))
    }

    fn of(plane: Plane) -> Self {
        Self {
            plane,
            granted: Mutex::default(),
            connected: Mutex::default(),
        }
    }

    /// The QUIC receiver's port (`None` for UCX, which needs no listening port of ours).
    pub fn quic_port(&self) -> Option<u16> {
        match &self.plane {
            Plane::QuicRecv(s) => s.local_addr().ok().map(|a| a.port()),
            _ => None,
        }
    }

    /// What the workers send through.
    pub fn transport(&self) -> Arc<dyn KvTransport> {
        match &self.plane {
            Plane::QuicSend(t) => t.clone(),
            #[cfg(feature = "ucx")]
            Plane::UcxSend(t) => t.clone(),
            // A decode process only receives.
            _ => Arc::new(InProcTransport::new()),
        }
    }

    /// Binds a decode endpoint (QUIC or UCX).
    pub fn bind(&self, ep: u32) -> Option<KvInbox> {
        match &self.plane {
            Plane::QuicRecv(s) => Some(s.bind(ep)),
            #[cfg(feature = "ucx")]
            Plane::UcxRecv(s) => match s.bind(ep) {
                Ok(i) => Some(i),
                Err(e) => {
                    tracing::error!(endpoint = ep, "UCX bind: {e}");
                    None
                }
            },
            _ => None,
        }
    }

    /// Decode: a grant for prefill worker `sender` to write into endpoint `ep`, the first time
    /// that pair meets (UCX); nothing for QUIC.
    pub async fn grant_for(&self, ep: u32, sender: u32) -> Result<Option<Vec<u8>>, TransportError> {
        match &self.plane {
            #[cfg(feature = "ucx")]
            Plane::UcxRecv(s) => {
                if !self
                    .granted
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((ep, sender))
                {
                    return Ok(None);
                }
                match s.grant(ep).await {
                    Ok(g) => Ok(Some(g.to_bytes())),
                    Err(e) => {
                        self.granted
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&(ep, sender));
                        Err(e)
                    }
                }
            }
            _ => {
                let _ = (ep, sender, &self.granted);
                Ok(None)
            }
        }
    }

    /// Prefill: makes endpoint `ep` reachable before the job's first frame — its QUIC address,
    /// or its UCX grant (needed the first time only).
    pub async fn route(
        &self,
        ep: u32,
        kv_addr: &str,
        grant: Option<&[u8]>,
    ) -> Result<(), TransportError> {
        match &self.plane {
            Plane::QuicSend(t) => {
                let addr = kv_addr.parse::<SocketAddr>().map_err(|e| {
                    TransportError::Protocol(format!("KV address {kv_addr:?}: {e}"))
                })?;
                t.add_peer(ep, addr);
                Ok(())
            }
            #[cfg(feature = "ucx")]
            Plane::UcxSend(t) => match grant {
                Some(g) => {
                    let g = duet_transport::ucx::UcxGrant::from_bytes(g)?;
                    t.connect(ep, g).await?;
                    self.connected
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(ep);
                    Ok(())
                }
                None if self
                    .connected
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(&ep) =>
                {
                    Ok(())
                }
                None => Err(TransportError::UnknownEndpoint(ep)),
            },
            _ => {
                let _ = (grant, &self.connected);
                Err(TransportError::Protocol(
                    "a decode process sends no KV".into(),
                ))
            }
        }
    }
}

#[cfg(not(feature = "ucx"))]
fn no_ucx() -> TransportError {
    TransportError::Setup(
        "this duet was built without UCX; rebuild with `cargo build --release --features ucx` \
         (needs libucx-dev) or use --kv-transport quic"
            .into(),
    )
}
