//! A shutdown signal that any number of tasks can wait on.

use tokio::sync::watch;

/// Fires [`Shutdown`] for every clone when triggered or dropped.
#[derive(Debug)]
pub(crate) struct Trigger(watch::Sender<bool>);

/// Resolves once shutdown begins.
#[derive(Clone, Debug)]
pub(crate) struct Shutdown(watch::Receiver<bool>);

/// A linked trigger and signal.
pub(crate) fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    /// Begins shutdown.
    pub(crate) fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// Waits until shutdown begins (at once if it already has). Cancel-safe.
    pub(crate) async fn wait(&mut self) {
        // An error means the trigger is gone, which also means shut down.
        let _ = self.0.wait_for(|fired| *fired).await;
    }

    /// Whether shutdown has begun.
    pub(crate) fn is_fired(&self) -> bool {
        *self.0.borrow()
    }
}
