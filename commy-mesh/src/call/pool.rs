//! The pools of a mesh handle: per service (or topic subscriber set), the
//! instances its discovery source knows and our links to them, and the
//! pick of the instance a call goes to.
//!
//! The per-call path is [`Pools::connected`]: a live link chosen by the
//! pool's balancer under the pool's lock, without allocating; a service
//! with a single instance is remembered per thread ([`LastCalled`]), so
//! calling it again takes no lock at all. Finding instances and
//! connecting ([`Pools::pick`]) happen off that path.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use commy_core::{InstanceId, Limits, MeshName, ServiceName, Status};
use commy_discovery::{Discover, Instance, PowerOfTwo};
use commy_shm::{LinkConfig, ShmLink};
use parking_lot::Mutex;
use rustc_hash::FxHashMap;

use crate::call::shm::ClientConn;

/// Ids of pool sets, so a thread's [`LastCalled`] never mixes them up.
static NEXT_POOLS_ID: AtomicU64 = AtomicU64::new(1);

/// The pools of one mesh handle's services (or of its topics' subscriber
/// sets), fed by one discovery source.
pub(crate) struct Pools {
    /// Unique among this process's pool sets.
    id: u64,
    /// The mesh's name, for errors.
    mesh: MeshName,
    /// Where instances are found.
    source: Arc<dyn Discover>,
    /// How links to instances are made.
    link: LinkConfig,
    limits: Limits,
    call_spin: Duration,
    /// Where pools' watches run.
    runtime: tokio::runtime::Handle,
    map: Mutex<FxHashMap<ServiceName, Arc<Pool>>>,
}

impl Pools {
    /// Pools fed by `source`, whose links are made with `link`, `limits`
    /// and `call_spin`; watches run on `runtime`.
    pub(crate) fn new(
        mesh: MeshName,
        source: Arc<dyn Discover>,
        link: LinkConfig,
        limits: Limits,
        call_spin: Duration,
        runtime: tokio::runtime::Handle,
    ) -> Pools {
        Pools {
            id: NEXT_POOLS_ID.fetch_add(1, Ordering::Relaxed),
            mesh,
            source,
            link,
            limits,
            call_spin,
            runtime,
            map: Mutex::new(FxHashMap::default()),
        }
    }

    /// The pool of `service`, made (and its watch started) on first use.
    pub(crate) fn get(&self, service: &ServiceName) -> Arc<Pool> {
        let mut pools = self.map.lock();
        pools
            .entry(service.clone())
            .or_insert_with(|| {
                let pool = Arc::new(Pool {
                    source: self.source.clone(),
                    service: service.clone(),
                    state: Mutex::new(PoolState::default()),
                    connecting: tokio::sync::Mutex::new(()),
                    balancer: PowerOfTwo::new(),
                });
                spawn_watch(&self.runtime, &pool);
                pool
            })
            .clone()
    }

    /// The known instances of a pool (scanning once if none are known yet).
    pub(crate) fn instances_of(&self, pool: &Arc<Pool>) -> Vec<Instance> {
        let known = pool.state.lock().instances.clone();
        if !known.is_empty() {
            return known;
        }
        let scanned = pool.source.instances(&pool.service).unwrap_or_default();
        pool.state.lock().set_instances(scanned.clone());
        scanned
    }

    /// Picks an instance (least loaded of two random choices) and returns a
    /// live link to it, connecting if needed.
    pub(crate) async fn pick(&self, pool: &Arc<Pool>) -> Result<Arc<ClientConn>, Status> {
        let mut instances = pool.state.lock().instances.clone();
        if instances.is_empty() {
            // The watch may not have delivered its first snapshot yet.
            instances = pool.source.instances(&pool.service).map_err(|e| {
                Status::unavailable(format!("cannot list instances of {}: {e}", pool.service))
            })?;
            pool.state.lock().set_instances(instances.clone());
        }
        let mut tried = 0;
        while !instances.is_empty() {
            let idx = choose(pool, &instances, &pool.state.lock().conns);
            let inst = instances.swap_remove(idx);
            tried += 1;
            match self.connect(pool, &inst).await {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::debug!("instance {} of {} unusable: {e}", inst.id, pool.service);
                    let mut state = pool.state.lock();
                    let mut left = std::mem::take(&mut state.instances);
                    left.retain(|i| i.id != inst.id);
                    state.set_instances(left);
                }
            }
        }
        if tried == 0 {
            Err(Status::not_found(format!(
                "no instance of service '{}' in mesh '{}'",
                pool.service, self.mesh
            )))
        } else {
            Err(Status::unavailable(format!(
                "no reachable instance of service '{}' ({tried} tried)",
                pool.service
            )))
        }
    }

    pub(crate) async fn connect(
        &self,
        pool: &Arc<Pool>,
        inst: &Instance,
    ) -> Result<Arc<ClientConn>, Status> {
        if let Some(c) = pool.state.lock().conns.get(&inst.id) {
            if c.is_alive() {
                return Ok(c.clone());
            }
        }
        let _one_at_a_time = pool.connecting.lock().await;
        if let Some(c) = pool.state.lock().conns.get(&inst.id) {
            if c.is_alive() {
                return Ok(c.clone());
            }
        }
        let commy_core::Endpoint::Shm(addr) = &inst.endpoint else {
            return Err(Status::unavailable(
                "only shared-memory endpoints are supported",
            ));
        };
        let path = addr.to_path_buf();
        let link_config = self.link.clone();
        let link = tokio::task::spawn_blocking(move || ShmLink::connect(path, link_config))
            .await
            .map_err(|e| Status::internal(format!("connect task failed: {e}")))?
            .map_err(|e| Status::unavailable(format!("cannot connect to {}: {e}", inst.id)))?;
        let conn = ClientConn::start(inst.id, link, self.limits, self.call_spin);
        pool.state.lock().conns.insert(inst.id, conn.clone());
        Ok(conn)
    }

    /// The fast path of picking: a live link to an instance of a service
    /// already known, chosen like [`pick`](Pools::pick), without allocating.
    /// Also says whether the call must be counted for balancing (only if
    /// there are several instances).
    ///
    /// A service with one instance is remembered per thread (see
    /// [`LastCalled`]): calling it again skips the pool's two locks.
    pub(crate) fn connected(&self, name: &str) -> Option<(Arc<ClientConn>, bool)> {
        if let Some(conn) = LastCalled::get(self.id, name) {
            return Some((conn, false));
        }
        let pools = self.map.lock();
        let pool = pools.get(name)?;
        let state = pool.state.lock();
        if state.instances.is_empty() {
            return None;
        }
        let idx = choose(pool, &state.instances, &state.conns);
        let conn = state.conns.get(&state.instances[idx].id)?;
        if !conn.is_alive() {
            return None;
        }
        let several = state.instances.len() > 1;
        if !several {
            // Under the pool's lock, like every change of its instances,
            // which clears the mark again.
            conn.sole.store(true, Ordering::Relaxed);
            LastCalled::set(self.id, name, conn);
        }
        Some((conn.clone(), several))
    }

    /// Drops every pool (and with them our links).
    pub(crate) fn clear(&self) {
        self.map.lock().clear();
    }
}

/// A pool's instances and our links to them, under one lock.
#[derive(Default)]
pub(crate) struct PoolState {
    instances: Vec<Instance>,
    conns: FxHashMap<InstanceId, Arc<ClientConn>>,
}

impl PoolState {
    /// Replaces the known instances. No link stays marked as its service's
    /// only one ([`ClientConn::sole`]) until a call finds it so again.
    fn set_instances(&mut self, instances: Vec<Instance>) {
        for c in self.conns.values() {
            c.sole.store(false, Ordering::Relaxed);
        }
        self.instances = instances;
    }
}

/// The service a thread called last, if it has a single instance: repeated
/// calls to it find their link without taking the pool's locks. The entry
/// holds the link weakly (it never keeps a link open) and is used only
/// while the link lives and is still marked as the service's only instance
/// ([`ClientConn::sole`]; any change of the pool's instances clears it).
pub(crate) struct LastCalled {
    mesh: u64,
    service: Box<str>,
    conn: std::sync::Weak<ClientConn>,
}

thread_local! {
    static LAST_CALLED: std::cell::RefCell<Option<LastCalled>> =
        const { std::cell::RefCell::new(None) };
}

impl LastCalled {
    fn get(mesh: u64, service: &str) -> Option<Arc<ClientConn>> {
        LAST_CALLED.with_borrow(|last| {
            let last = last.as_ref()?;
            if last.mesh != mesh || &*last.service != service {
                return None;
            }
            let conn = last.conn.upgrade()?;
            (conn.is_alive() && conn.sole.load(Ordering::Relaxed)).then_some(conn)
        })
    }

    fn set(mesh: u64, service: &str, conn: &Arc<ClientConn>) {
        LAST_CALLED.with_borrow_mut(|last| match last {
            Some(l) if l.mesh == mesh && &*l.service == service => {
                l.conn = Arc::downgrade(conn);
            }
            _ => {
                *last = Some(LastCalled {
                    mesh,
                    service: service.into(),
                    conn: Arc::downgrade(conn),
                });
            }
        });
    }
}

/// The client side of one service: its instances and our links to them.
pub(crate) struct Pool {
    /// Where its instances are found (services or topics).
    source: Arc<dyn Discover>,
    pub(crate) service: ServiceName,
    state: Mutex<PoolState>,
    /// Serialises connection attempts per instance.
    connecting: tokio::sync::Mutex<()>,
    balancer: PowerOfTwo,
}

impl Pool {
    /// Whether the pool knows no instance (yet, or any more).
    pub(crate) fn is_empty(&self) -> bool {
        self.state.lock().instances.is_empty()
    }
}

/// The instance a call goes to: the less loaded of two random choices (by
/// calls in flight on our links). `instances` is not empty.
pub(crate) fn choose(
    pool: &Pool,
    instances: &[Instance],
    conns: &FxHashMap<InstanceId, Arc<ClientConn>>,
) -> usize {
    let load = |i: usize| {
        conns
            .get(&instances[i].id)
            .map_or(0, |c| c.in_flight.load(Ordering::Relaxed) as u64)
    };
    pool.balancer.pick(instances.len(), load).unwrap_or(0)
}

/// Keeps `pool.instances` up to date from the local registry's watch, and
/// drops links to instances that vanished.
pub(crate) fn spawn_watch(runtime: &tokio::runtime::Handle, pool: &Arc<Pool>) {
    let weak = Arc::downgrade(pool);
    let watch = pool.source.watch(&pool.service);
    let service = pool.service.clone();
    runtime.spawn(async move {
        let mut watch = match watch {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("cannot watch instances of {service}: {e}");
                return;
            }
        };
        while let Some(set) = std::future::poll_fn(|cx| watch.as_mut().poll_next(cx)).await {
            let Some(pool) = weak.upgrade() else { return };
            let mut state = pool.state.lock();
            state.set_instances(set);
            let PoolState { instances, conns } = &mut *state;
            conns.retain(|id, c| c.is_alive() && instances.iter().any(|i| i.id == *id));
        }
    });
}
