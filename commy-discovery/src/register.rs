//! The other half of the discovery seam: where a process announces the
//! instances it serves so that processes on other hosts find them.
//!
//! On this host the announcement is the instance's socket in the runtime
//! dir (see [`LocalRegistry`](crate::LocalRegistry)): binding it is
//! registering. Across hosts a process announces each instance it serves
//! over TLS to every [`Register`] it was given (etcd, a service catalog of
//! the user's own), and withdraws it when the instance stops: the
//! [`Registration`] a registrar returns withdraws on drop.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use commy_core::ServiceName;
//! use commy_discovery::{DiscoveryError, Instance, Register, Registration};
//!
//! /// Keeps the announced endpoints in memory.
//! #[derive(Default)]
//! struct Catalog(Arc<Mutex<Vec<String>>>);
//!
//! impl Register for Catalog {
//!     fn name(&self) -> &'static str {
//!         "catalog"
//!     }
//!
//!     fn register(&self, instance: &Instance) -> Result<Registration, DiscoveryError> {
//!         let entry = format!("{} {}", instance.service, instance.endpoint);
//!         self.0.lock().unwrap().push(entry.clone());
//!         let list = self.0.clone();
//!         Ok(Registration::new(move || list.lock().unwrap().retain(|e| *e != entry)))
//!     }
//! }
//! # let _ = ServiceName::new("x");
//! ```

use std::fmt;

use crate::local::{DiscoveryError, Instance};

/// A place where this process announces the instances it serves across
/// hosts.
pub trait Register: Send + Sync + 'static {
    /// A short name for logs (`etcd`, `catalog`).
    fn name(&self) -> &'static str;

    /// Announces `instance` (its service, id, `tls://` endpoint and host)
    /// until the returned registration is withdrawn or dropped. Called on
    /// the thread that starts serving: it must not block for long.
    fn register(&self, instance: &Instance) -> Result<Registration, DiscoveryError>;
}

/// An instance announced by a [`Register`]: withdrawn when dropped (or by
/// [`withdraw`](Registration::withdraw)), once.
pub struct Registration {
    withdraw: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Registration {
    /// A registration that `withdraw` ends.
    pub fn new(withdraw: impl FnOnce() + Send + Sync + 'static) -> Registration {
        Registration {
            withdraw: Some(Box::new(withdraw)),
        }
    }

    /// Withdraws the announcement now.
    pub fn withdraw(mut self) {
        self.run();
    }

    fn run(&mut self) {
        if let Some(f) = self.withdraw.take() {
            f();
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.run();
    }
}

impl fmt::Debug for dyn Register {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Register({})", self.name())
    }
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("withdrawn", &self.withdraw.is_none())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_registration_is_withdrawn_once_by_drop_or_by_hand() {
        let count = Arc::new(AtomicUsize::new(0));
        let counted = || {
            let c = count.clone();
            Registration::new(move || {
                c.fetch_add(1, Ordering::SeqCst);
            })
        };
        drop(counted());
        assert_eq!(count.load(Ordering::SeqCst), 1);
        counted().withdraw();
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }
}
