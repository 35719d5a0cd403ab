//! A worker of another process, as the actors of this one see it: an actor that accepts exactly
//! the messages its local senders may send that worker ([`crate::protocol`] splits them by
//! sender) and forwards each over the control connection. One generic actor serves both
//! directions; what forwarding a message means is its [`Forward`] impl — hub.rs for the gateway's
//! messages to worker processes, link.rs for a worker process's messages to the other role.

use std::future::Future;
use std::marker::PhantomData;

use ractor::{Actor, ActorProcessingErr, ActorRef, DerivedActorRef};

/// A message that can be forwarded to a worker of another process.
pub trait Forward: Sized + Send + 'static {
    /// What forwarding needs: the connection and which remote worker this stands for.
    type Via: Send + Sync + 'static;

    fn forward(self, via: &Self::Via) -> impl Future<Output = ()> + Send;
}

/// Stands for one remote worker; forwards every message it is given.
pub struct Forwarder<M>(PhantomData<fn() -> M>);

impl<M: Forward> Forwarder<M> {
    /// Spawns the stand-in and hands back the reference local senders use.
    pub async fn spawn(via: M::Via) -> Result<DerivedActorRef<M>, ActorProcessingErr> {
        let (a, _) = Actor::spawn(None, Forwarder::<M>(PhantomData), via).await?;
        Ok(a.get_derived())
    }
}

impl<M: Forward> Actor for Forwarder<M> {
    type Msg = M;
    type State = M::Via;
    type Arguments = M::Via;

    async fn pre_start(
        &self,
        _myself: ActorRef<M>,
        via: M::Via,
    ) -> Result<M::Via, ActorProcessingErr> {
        Ok(via)
    }

    async fn handle(
        &self,
        _myself: ActorRef<M>,
        msg: M,
        via: &mut M::Via,
    ) -> Result<(), ActorProcessingErr> {
        msg.forward(via).await;
        Ok(())
    }
}
