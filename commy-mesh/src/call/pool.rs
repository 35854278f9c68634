//! The pools of a mesh handle: per service (or topic subscriber set), the
//! instances its discovery sources know (this host's runtime dir, the TLS
//! peers' listings), our links to them, and the pick of the instance a
//! call goes to.
//!
//! One pool holds a service's local and remote instances. The pick goes
//! by tiers: instances reached over shared memory first, then those
//! reached over TLS; the call's transport preference filters the tiers
//! (`shm`: the first only, `tls`: the second only). Within a tier the
//! pool's balancer chooses. A local instance that cannot be connected to
//! is dropped from the pool and the pick goes on, to the TLS tier if need
//! be (counted as a fallback).
//!
//! The per-call path is [`Pools::connected`]: a live shared-memory link
//! chosen by the pool's balancer under the pool's lock, without
//! allocating; a service with a single instance is remembered per thread
//! ([`LastCalled`]), so calling it again takes no lock at all. Finding
//! instances and connecting ([`Pools::pick`]) happen off that path.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use commy_config::TransportPreference;
use commy_core::{Deadline, InstanceId, Limits, MeshName, ServiceName, Status};
use commy_discovery::{Discover, Instance, Maglev, PowerOfTwo, RoundRobin, Standing};
use commy_shm::{LinkConfig, ShmLink};
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use smallvec::SmallVec;

use crate::call::clock::now_ms;
use crate::call::endpoint::{Endpoint, TlsInstance};
use crate::call::policy::{CallPolicies, CallPolicy};
use crate::call::reader;
use crate::call::resilience::PoolHealth;
use crate::call::resilience::{Resilience, Strategy};
use crate::call::shm::ClientConn;
use crate::call::stats::EndpointStats;
use crate::call::tls::Peers;

/// Ids of pool sets, so a thread's [`LastCalled`] never mixes them up.
static NEXT_POOLS_ID: AtomicU64 = AtomicU64::new(1);

/// How long a pick waits for peers that have not said yet what they serve.
const FIRST_LISTING_WAIT: Duration = Duration::from_secs(3);

/// The pools of one mesh handle's services (or of its topics' subscriber
/// sets), fed by the same discovery sources.
pub(crate) struct Pools {
    /// Unique among this process's pool sets.
    id: u64,
    /// The mesh's name, for errors.
    mesh: MeshName,
    /// Where instances are found; the first is this host's runtime dir.
    sources: Arc<[Arc<dyn Discover>]>,
    /// The TLS peers, when the handle has any: the links of instances
    /// with a `tls://` endpoint.
    peers: Option<Arc<Peers>>,
    /// How shared-memory links to instances are made.
    link: LinkConfig,
    limits: Limits,
    call_spin: Duration,
    /// Gives each pool its call policy.
    policies: Option<CallPolicies>,
    /// How pools eject failing instances and retry failed calls.
    resilience: Arc<Resilience>,
    /// Where pools' watches run.
    runtime: tokio::runtime::Handle,
    map: Mutex<FxHashMap<ServiceName, Arc<Pool>>>,
}

impl Pools {
    /// Pools fed by `sources` (this host's first); shared-memory links are
    /// made with `link`, `limits` and `call_spin`, TLS ones through
    /// `peers`; each pool's call policy comes from `policies`; watches run
    /// on `runtime`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        mesh: MeshName,
        sources: Vec<Arc<dyn Discover>>,
        peers: Option<Arc<Peers>>,
        link: LinkConfig,
        limits: Limits,
        call_spin: Duration,
        policies: Option<CallPolicies>,
        resilience: Arc<Resilience>,
        runtime: tokio::runtime::Handle,
    ) -> Pools {
        Pools {
            id: NEXT_POOLS_ID.fetch_add(1, Ordering::Relaxed),
            mesh,
            sources: sources.into(),
            peers,
            link,
            limits,
            call_spin,
            policies,
            resilience,
            runtime,
            map: Mutex::new(FxHashMap::default()),
        }
    }

    /// The pool of `service`, made (and its watches started) on first use.
    pub(crate) fn get(&self, service: &ServiceName) -> Arc<Pool> {
        let mut pools = self.map.lock();
        pools
            .entry(service.clone())
            .or_insert_with(|| {
                let health = Arc::new(self.resilience.pool_health(service));
                let strategy = self.resilience.strategy(service);
                let pool = Arc::new(Pool {
                    sources: self.sources.clone(),
                    service: service.clone(),
                    state: Mutex::new(PoolState::new(
                        self.sources.len(),
                        health.clone(),
                        strategy == Strategy::Maglev,
                    )),
                    health,
                    strategy,
                    turns: RoundRobin::new(),
                    connecting: tokio::sync::Mutex::new(()),
                    balancer: PowerOfTwo::new(),
                    policy: self.policies.as_ref().and_then(|p| p.get(service)),
                    watches: Mutex::new(Vec::new()),
                    version: AtomicU64::new(0),
                });
                for i in 0..self.sources.len() {
                    spawn_watch(&self.runtime, &pool, i);
                }
                pool
            })
            .clone()
    }

    /// The instances of a pool reached over shared memory (scanning this
    /// host once if its watch has not said yet).
    pub(crate) fn instances_of(&self, pool: &Arc<Pool>) -> Vec<Instance> {
        {
            let state = pool.state.lock();
            if !state.local.is_empty() || state.sets[0].is_some() {
                return state.local.clone();
            }
        }
        let _ = pool.scan_local();
        pool.state.lock().local.clone()
    }

    /// Every shared-memory instance of `pool` with its live link if it
    /// has one, under one lock and without allocating for up to
    /// [`LOCAL_INLINE`] of them (scanning this host once if its watch has
    /// not said yet): the per-publish path.
    pub(crate) fn local_links(&self, pool: &Arc<Pool>) -> LocalLinks {
        self.local_links_at(pool).1
    }

    /// [`local_links`](Pools::local_links), and the pool's
    /// [`version`](Pool::version) they are of.
    pub(crate) fn local_links_at(&self, pool: &Arc<Pool>) -> (u64, LocalLinks) {
        let mut state = pool.state.lock();
        if state.local.is_empty() && state.sets[0].is_none() {
            drop(state);
            let _ = pool.scan_local();
            state = pool.state.lock();
        }
        // Changes are counted under the lock: this is the count of what
        // is read here.
        let version = pool.version.load(Ordering::Relaxed);
        let links = state
            .local
            .iter()
            .map(|inst| match state.conns.get(&inst.id) {
                Some(ep) if ep.is_alive() => LocalLink::Linked(ep.clone(), inst.id),
                _ => LocalLink::Unlinked(inst.id),
            })
            .collect();
        (version, links)
    }

    /// Picks an instance for a call with the transport `preference` and
    /// returns a live link to it (connecting if needed) and the instance's
    /// id. `deadline` bounds the wait for peers that have not listed their
    /// instances yet. Only instances the pool's call policy admits are
    /// picked; `avoid` (the instance a retried call failed at) only when
    /// no other may take the call. `key`: the call's hash key, for a pool
    /// that hashes.
    pub(crate) async fn pick(
        &self,
        pool: &Arc<Pool>,
        preference: TransportPreference,
        deadline: Option<Deadline>,
        avoid: Option<InstanceId>,
        key: Option<&[u8]>,
    ) -> Result<(Endpoint, InstanceId), Status> {
        let mut tried = 0;
        // Why the last local instance could not be reached.
        let mut failed: Option<Status> = None;
        // Whether the call policy refused every instance of a tier.
        let mut refused = false;
        if preference != TransportPreference::Tls {
            let local = pool.scan_local().map_err(|e| {
                Status::unavailable(format!("cannot list instances of {}: {e}", pool.service))
            })?;
            // Each failed instance is forgotten: at most one try each.
            for _ in 0..local {
                let inst = match pool.choose_from(Tier::Local, avoid, key) {
                    Chosen::Empty => break,
                    Chosen::Refused => {
                        refused = true;
                        break;
                    }
                    Chosen::Linked(ep, id) => return Ok((ep, id)),
                    Chosen::Unlinked(inst) => inst,
                };
                tried += 1;
                // With another instance left to try, a handshake that does
                // not finish soon is given up for it.
                let hedge = (tried < local).then_some(HANDSHAKE_HEDGE);
                match self.connect_hedged(pool, &inst, deadline, hedge).await {
                    Ok(ep) => return Ok((ep, inst.id)),
                    Err(e) => {
                        if e.code() == commy_core::Code::DeadlineExceeded {
                            // No time left to try another. The instance
                            // was slow, not proven gone: it stays known.
                            return Err(e);
                        }
                        tracing::debug!("instance {} of {} unusable: {e}", inst.id, pool.service);
                        pool.change(|state| state.forget(inst.id));
                        failed = Some(e);
                    }
                }
            }
        }
        let peers = match (&self.peers, preference) {
            (Some(peers), TransportPreference::Auto | TransportPreference::Tls) => peers,
            (None, TransportPreference::Tls) => {
                return Err(Status::failed_precondition(
                    "the TLS transport is not configured (no listen address or peers)",
                ));
            }
            _ if refused && failed.is_none() => return Err(refused_all(pool)),
            _ => return Err(self.none_reached(pool, tried, failed)),
        };
        let inst = match pool.choose_from(Tier::Remote, avoid, key) {
            Chosen::Linked(ep, id) => return Ok((fell_back(pool, peers, &failed, ep), id)),
            Chosen::Unlinked(inst) => inst,
            Chosen::Refused => return Err(failed.unwrap_or_else(|| refused_all(pool))),
            Chosen::Empty => {
                // The pool's watch of the peers may not have delivered yet:
                // ask them directly, after waiting for those that have not
                // listed their instances yet.
                if peers.any_untried() {
                    let wait = deadline.map_or(FIRST_LISTING_WAIT, |d| {
                        d.remaining().min(FIRST_LISTING_WAIT)
                    });
                    peers.wait_listed(wait).await;
                }
                let remote = peers.instances_of(&pool.service);
                if remote.is_empty() {
                    if refused && failed.is_none() {
                        return Err(refused_all(pool));
                    }
                    return Err(self.none_remote(pool, peers, failed, deadline));
                }
                match pool.choose(&remote, avoid) {
                    Some(i) => remote[i].clone(),
                    None => return Err(failed.unwrap_or_else(|| refused_all(pool))),
                }
            }
        };
        let ep = self.connect(pool, &inst, deadline).await?;
        Ok((fell_back(pool, peers, &failed, ep), inst.id))
    }

    /// The failure of a pick that found no instance at any peer.
    fn none_remote(
        &self,
        pool: &Pool,
        peers: &Peers,
        failed: Option<Status>,
        deadline: Option<Deadline>,
    ) -> Status {
        if let Some(status) = failed {
            return status;
        }
        // Not found only once every peer has said what it serves: a
        // deadline that passes while a peer is still being reached is the
        // deadline's failure.
        if deadline.is_some_and(Deadline::is_expired) && peers.any_untried() {
            return Status::deadline_exceeded(format!(
                "the deadline passed while peers were still being asked for service '{}'",
                pool.service
            ));
        }
        // Peers that could not be asked may serve it: their reasons are
        // the answer, not "nobody serves it".
        let failures = peers.failures();
        if !failures.is_empty() {
            return Status::unavailable(format!(
                "no instance of service '{}' locally or at a peer that answered; \
                 unreachable: {}",
                pool.service,
                failures.join("; ")
            ));
        }
        Status::not_found(format!(
            "no instance of service '{}' (locally or at any peer)",
            pool.service
        ))
    }

    /// The failure of a pick that reached no instance; `last`: why the
    /// last one tried could not be reached.
    fn none_reached(&self, pool: &Pool, tried: usize, last: Option<Status>) -> Status {
        match last {
            None if tried == 0 => Status::not_found(format!(
                "no instance of service '{}' in mesh '{}'",
                pool.service, self.mesh
            )),
            None => Status::unavailable(format!(
                "no reachable instance of service '{}' ({tried} tried)",
                pool.service
            )),
            Some(last) => Status::unavailable(format!(
                "no reachable instance of service '{}' ({tried} tried; the last: {})",
                pool.service,
                last.message()
            )),
        }
    }

    /// A live link to `inst`, made by its endpoint's scheme if there is
    /// none yet: a shared-memory link of our own, or the connection to the
    /// TLS peer that listed it. `deadline` (the call's) bounds a
    /// shared-memory handshake: an instance that does not finish it in
    /// time fails with `DeadlineExceeded` (a frozen instance costs a call
    /// no more than its timeout).
    pub(crate) async fn connect(
        &self,
        pool: &Arc<Pool>,
        inst: &Instance,
        deadline: Option<Deadline>,
    ) -> Result<Endpoint, Status> {
        self.connect_hedged(pool, inst, deadline, None).await
    }

    /// The live link to `inst` of `pool`, if it has one (no connecting).
    pub(crate) fn linked(&self, pool: &Arc<Pool>, inst: &Instance) -> Option<Endpoint> {
        pool.state
            .lock()
            .conns
            .get(&inst.id)
            .filter(|ep| ep.is_alive())
            .cloned()
    }

    /// [`connect`](Pools::connect), giving a shared-memory handshake at
    /// most `hedge` when another instance could be tried instead: an
    /// instance that does not finish it by then fails with `Unavailable`
    /// (and the pick forgets it until its source's next set, as any
    /// instance it could not reach).
    async fn connect_hedged(
        &self,
        pool: &Arc<Pool>,
        inst: &Instance,
        deadline: Option<Deadline>,
        hedge: Option<Duration>,
    ) -> Result<Endpoint, Status> {
        if let Some(ep) = self.linked(pool, inst) {
            return Ok(ep);
        }
        let _one_at_a_time = pool.connecting.lock().await;
        if let Some(ep) = self.linked(pool, inst) {
            return Ok(ep);
        }
        let ep = match &inst.endpoint {
            commy_core::Endpoint::Shm(addr) => {
                let path = addr.to_path_buf();
                let mut link_config = self.link.clone();
                let cut_short =
                    deadline.is_some_and(|d| d.remaining() < link_config.handshake_timeout);
                if let Some(d) = deadline.filter(|_| cut_short) {
                    // Zero would mean no wait at all, not an expired one.
                    link_config.handshake_timeout = d.remaining().max(Duration::from_micros(1));
                }
                let hedged = hedge.filter(|&h| h < link_config.handshake_timeout);
                if let Some(h) = hedged {
                    link_config.handshake_timeout = h;
                }
                let link = tokio::task::spawn_blocking(move || ShmLink::connect(path, link_config))
                    .await
                    .map_err(|e| Status::internal(format!("connect task failed: {e}")))?
                    .map_err(|e| {
                        if cut_short && deadline.is_some_and(Deadline::is_expired) {
                            Status::deadline_exceeded(format!(
                                "the deadline passed while connecting to instance {}: {e}",
                                inst.id
                            ))
                        } else if let Some(h) = hedged.filter(|_| is_timeout(&e)) {
                            Status::unavailable(format!(
                                "instance {} did not finish its handshake within {h:?}: {e}",
                                inst.id
                            ))
                        } else {
                            Status::unavailable(format!("cannot connect to {}: {e}", inst.id))
                        }
                    })?;
                {
                    let policy = pool.policy.clone();
                    let stats = EndpointStats::new(pool.health.clone());
                    let conn =
                        ClientConn::new(link, inst.id, policy, stats, self.limits, self.call_spin);
                    reader::spawn(&conn, inst.id);
                    Endpoint::Shm(conn)
                }
            }
            commy_core::Endpoint::Tls(addr) => {
                let peer = self
                    .peers
                    .as_ref()
                    .and_then(|p| p.peer(addr))
                    .ok_or_else(|| {
                        Status::unavailable(format!("{addr} is not a peer of this mesh handle"))
                    })?;
                let stats = EndpointStats::new(pool.health.clone());
                Endpoint::Tls(Arc::new(TlsInstance::new(peer.clone(), stats)))
            }
            other => {
                return Err(Status::unavailable(format!(
                    "instance {} has an endpoint this mesh cannot reach: {other}",
                    inst.id
                )));
            }
        };
        pool.change(|state| state.link(inst.id, ep.clone()));
        Ok(ep)
    }

    /// The fast path of picking: a live shared-memory link to an instance
    /// of a service already known, chosen like [`pick`](Pools::pick),
    /// without allocating. Also says whether the call must be counted for
    /// balancing (only if there are several instances).
    ///
    /// A service with one instance is remembered per thread (see
    /// [`LastCalled`]): calling it again skips the pool's two locks.
    pub(crate) fn connected(
        &self,
        name: &str,
        key: Option<&[u8]>,
    ) -> Option<(Arc<ClientConn>, bool)> {
        if let Some(conn) = LastCalled::get(self.id, name) {
            match &conn.policy {
                None => return Some((conn, false)),
                Some(p) if p.admit(conn.instance, Some(&conn.stats)) => return Some((conn, false)),
                // The pool's pick says what happens to a refused instance.
                Some(_) => return None,
            }
        }
        let pools = self.map.lock();
        let pool = pools.get(name)?;
        let state = pool.state.lock();
        if state.local.is_empty() {
            return None;
        }
        let hashed = key.zip(state.tables.as_ref().map(|t| &t[0]));
        let idx = pool.choose_in(&state.local, &state.conns, None, hashed)?;
        let linked = state
            .conns
            .get(&state.local[idx].id)
            .and_then(Endpoint::shm);
        let Some(conn) = linked.filter(|conn| conn.takes_calls()) else {
            // The pick connects it, and takes the same turn again.
            if pool.strategy == Strategy::RoundRobin {
                pool.turns.back();
            }
            return None;
        };
        let several = state.local.len() > 1;
        if !several {
            // Under the pool's lock, like every change of its instances,
            // which clears the mark again.
            conn.sole.store(true, Ordering::Relaxed);
            LastCalled::set(self.id, name, conn);
        }
        Some((conn.clone(), several))
    }

    /// Every instance the pool of `service` knows, as its pick sees it
    /// (scanning this host once if its watch has not said yet).
    pub(crate) fn endpoints(&self, service: &ServiceName) -> Vec<EndpointInfo> {
        let pool = self.get(service);
        let _ = pool.scan_local();
        let state = pool.state.lock();
        let now = now_ms();
        state
            .local
            .iter()
            .chain(&state.remote)
            .map(|inst| {
                let ep = state.conns.get(&inst.id).filter(|ep| ep.is_alive());
                let stats = ep.map(Endpoint::stats);
                EndpointInfo {
                    instance: inst.id,
                    endpoint: inst.endpoint.clone(),
                    linked: ep.is_some(),
                    standing: stats
                        .map_or(Standing::In { failures: 0 }, |s| s.outlier.standing(now)),
                    ejections: stats.map_or(0, EndpointStats::ejections),
                    in_flight: stats.map_or(0, EndpointStats::in_flight),
                    failed_calls: stats.map_or(0, EndpointStats::failed_calls),
                    round_trip: match ep {
                        Some(Endpoint::Tls(tls)) => Some(tls.stats.ewma.rtt(now)),
                        _ => None,
                    },
                }
            })
            .collect()
    }

    /// Drops every pool (and with them our links), stopping their watches.
    pub(crate) fn clear(&self) {
        // The watches stop first: a watch whose directory a tidy-up then
        // removes would make it again.
        for pool in std::mem::take(&mut *self.map.lock()).into_values() {
            for watch in pool.watches.lock().drain(..) {
                watch.abort();
            }
        }
    }
}

/// One instance of a service as this handle's pool sees it
/// ([`Mesh::endpoints`](crate::Mesh::endpoints)).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EndpointInfo {
    /// The instance.
    pub instance: InstanceId,
    /// Where it is reached: a socket on this host (shared memory) or a TLS
    /// peer.
    pub endpoint: commy_core::Endpoint,
    /// Whether this handle has a live link to it (it has been called).
    pub linked: bool,
    /// In (with its failures in a row), ejected (for how long still), or
    /// half-open (trial calls decide).
    pub standing: Standing,
    /// Times it was ejected.
    pub ejections: u16,
    /// Calls sent to it and not answered yet (counted while its pool
    /// balances between instances).
    pub in_flight: u64,
    /// Its failed calls that count against it (see
    /// [`counts_against`](crate::policy::counts_against)).
    pub failed_calls: u64,
    /// Over TLS: the peak-EWMA estimate of its round trip, the balancer's
    /// load.
    pub round_trip: Option<Duration>,
}

/// How many instances [`Pools::local_links`] lists without allocating.
pub(crate) const LOCAL_INLINE: usize = 8;

/// A pool's shared-memory instances as [`Pools::local_links`] finds them.
pub(crate) type LocalLinks = SmallVec<[LocalLink; LOCAL_INLINE]>;

/// One shared-memory instance of a pool, as a publish finds it.
pub(crate) enum LocalLink {
    /// Its live link, and its id.
    Linked(Endpoint, InstanceId),
    /// No live link yet: the id of the instance to connect to.
    Unlinked(InstanceId),
}

/// A pool's instances and our links to them, under one lock.
struct PoolState {
    /// Each source's last set (`None` until its watch first delivers).
    sets: Vec<Option<Vec<Instance>>>,
    /// The instances reached over shared memory, from every source.
    local: Vec<Instance>,
    /// The instances reached over TLS, from every source.
    remote: Vec<Instance>,
    conns: FxHashMap<InstanceId, Endpoint>,
    /// The pool's count of ejected instances, set afresh at each change.
    health: Arc<PoolHealth>,
    /// For a pool that hashes: the Maglev tables of the local and the
    /// remote tier, made afresh at each change.
    tables: Option<[TierTable; 2]>,
}

impl PoolState {
    fn new(sources: usize, health: Arc<PoolHealth>, hashes: bool) -> PoolState {
        PoolState {
            sets: vec![None; sources],
            local: Vec::new(),
            remote: Vec::new(),
            conns: FxHashMap::default(),
            health,
            tables: hashes.then(|| [TierTable::build(&[]), TierTable::build(&[])]),
        }
    }

    /// Replaces source `i`'s set and with it the tiers. No link stays
    /// marked as its service's only one ([`ClientConn::sole`]) until a call
    /// finds it so again.
    fn set_source(&mut self, i: usize, set: Vec<Instance>) {
        self.sets[i] = Some(set);
        self.rebuild();
    }

    /// Keeps `ep`, a new link to instance `id` (a new link starts in its
    /// pool: the count of ejected instances is made again).
    fn link(&mut self, id: InstanceId, ep: Endpoint) {
        self.conns.insert(id, ep);
        self.recount();
    }

    /// Sets the pool's count of instances and of those ejected afresh from
    /// its links.
    fn recount(&self) {
        let out = self
            .conns
            .values()
            .filter(|ep| ep.stats().outlier.is_out())
            .count();
        self.health.reset(self.local.len() + self.remote.len(), out);
    }

    /// Forgets an instance that could not be reached (its source's next
    /// set may bring it back).
    fn forget(&mut self, id: InstanceId) {
        for set in self.sets.iter_mut().flatten() {
            set.retain(|i| i.id != id);
        }
        self.rebuild();
    }

    fn rebuild(&mut self) {
        for ep in self.conns.values() {
            if let Some(conn) = ep.shm() {
                conn.sole.store(false, Ordering::Relaxed);
            }
        }
        self.local.clear();
        self.remote.clear();
        for inst in self.sets.iter().flatten().flatten() {
            let tier = match inst.endpoint {
                commy_core::Endpoint::Shm(_) => &mut self.local,
                commy_core::Endpoint::Tls(_) => &mut self.remote,
                _ => continue,
            };
            if !tier.iter().any(|i| i.id == inst.id) {
                tier.push(inst.clone());
            }
        }
        let (local, remote) = (&self.local, &self.remote);
        self.conns.retain(|id, ep| {
            let listed = local.iter().chain(remote).any(|i| i.id == *id);
            if !listed && let Some(conn) = ep.shm() {
                // The instance left (drains or stopped): tell it we send no
                // more on this link, so that it may close it once it
                // answered what we sent.
                conn.go_away();
            }
            listed && ep.is_alive()
        });
        self.recount();
        if let Some(tables) = &mut self.tables {
            *tables = [TierTable::build(local), TierTable::build(remote)];
        }
    }
}

/// A tier's Maglev table: made over its instances in the order of their
/// ids, so that every process (and SDK) that knows the same instances
/// sends a key to the same one, whatever order discovery gave them in.
struct TierTable {
    table: Maglev,
    /// For each entry of the table, the instance's place in the tier.
    places: Vec<usize>,
}

impl TierTable {
    fn build(tier: &[Instance]) -> TierTable {
        let mut places: Vec<usize> = (0..tier.len()).collect();
        places.sort_by_key(|&i| tier[i].id.to_string());
        let names: Vec<String> = places.iter().map(|&i| tier[i].id.to_string()).collect();
        TierTable {
            table: Maglev::new(&names),
            places,
        }
    }

    /// The place in the tier of the instance `key` goes to.
    fn pick(&self, key: &[u8]) -> Option<usize> {
        self.table.pick(key).map(|i| self.places[i])
    }
}

/// The service a thread called last, if it has a single instance: repeated
/// calls to it find their link without taking the pool's locks. The entry
/// holds the link weakly (it never keeps a link open) and is used only
/// while the link lives and is still marked as the service's only instance
/// ([`ClientConn::sole`]; any change of the pool's instances clears it).
struct LastCalled {
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
            (conn.takes_calls() && conn.sole.load(Ordering::Relaxed)).then_some(conn)
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
    /// Where its instances are found (the first: this host).
    sources: Arc<[Arc<dyn Discover>]>,
    pub(crate) service: ServiceName,
    state: Mutex<PoolState>,
    /// Serialises connection attempts per instance.
    connecting: tokio::sync::Mutex<()>,
    balancer: PowerOfTwo,
    /// What its endpoints share: how many are ejected, the retry rules
    /// and budget.
    pub(crate) health: Arc<PoolHealth>,
    /// How it picks within a tier.
    strategy: Strategy,
    /// The turns of a round-robin pool.
    turns: RoundRobin,
    /// The service's call policy, if it has one.
    pub(crate) policy: Option<Arc<dyn CallPolicy>>,
    /// The tasks watching its sources.
    watches: Mutex<Vec<tokio::task::AbortHandle>>,
    /// Counts the changes of its instances and links (see
    /// [`Pool::change`]): a copy of them taken at one count is current
    /// while the count stays.
    version: AtomicU64,
}

impl Pool {
    /// Changes the pool's instances or links: every change goes through
    /// here, which counts it ([`Pool::version`]).
    fn change<R>(&self, f: impl FnOnce(&mut PoolState) -> R) -> R {
        let mut state = self.state.lock();
        let r = f(&mut state);
        // SYNC: Release, with the lock still held: whoever reads the new
        // count and then takes the lock sees the change.
        self.version.fetch_add(1, Ordering::Release);
        r
    }

    /// The count of the pool's changes so far: while it stays, the
    /// instances and links found at it are the pool's (a link may still
    /// die, which its own state says).
    pub(crate) fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// How many instances are reached over shared memory. If this host's
    /// source has not delivered its first set yet (its watch runs as a
    /// task), it is scanned now.
    fn scan_local(&self) -> Result<usize, commy_discovery::DiscoveryError> {
        {
            let state = self.state.lock();
            if !state.local.is_empty() || state.sets[0].is_some() {
                return Ok(state.local.len());
            }
        }
        let scanned = self.sources[0].instances(&self.service)?;
        Ok(self.change(|state| {
            if state.sets[0].is_none() {
                state.set_source(0, scanned);
            }
            state.local.len()
        }))
    }

    /// Chooses an instance of `tier` by its link's load, under the pool's
    /// lock and without copying the tier: its live link if it has one, else
    /// the instance to connect to.
    fn choose_from(&self, tier: Tier, avoid: Option<InstanceId>, key: Option<&[u8]>) -> Chosen {
        let state = self.state.lock();
        let (list, t) = match tier {
            Tier::Local => (&state.local, 0),
            Tier::Remote => (&state.remote, 1),
        };
        if list.is_empty() {
            return Chosen::Empty;
        }
        let hashed = key.zip(state.tables.as_ref().map(|tables| &tables[t]));
        let Some(i) = self.choose_in(list, &state.conns, avoid, hashed) else {
            return Chosen::Refused;
        };
        let inst = &list[i];
        match state.conns.get(&inst.id).filter(|ep| ep.is_alive()) {
            Some(ep) => Chosen::Linked(ep.clone(), inst.id),
            None => Chosen::Unlinked(inst.clone()),
        }
    }

    /// Chooses among `instances` (not empty) by their links' load; `None`
    /// if the call policy admits none.
    fn choose(&self, instances: &[Instance], avoid: Option<InstanceId>) -> Option<usize> {
        let state = self.state.lock();
        self.choose_in(instances, &state.conns, avoid, None)
    }

    /// The instance a call goes to, by the pool's strategy: the less
    /// loaded of two random choices (by [`Endpoint::load`]: calls in
    /// flight on a shared-memory link, peak-EWMA round trips of a TLS
    /// peer), the next in turn, or the one the call's key hashes to
    /// (`hashed`: the key and the tier's table), among those that may take
    /// it: not ejected (unless the pool is in panic mode, or the ejection
    /// is over and this call is the instance's trial) and admitted by the
    /// call policy; `avoid` only if no other may. When the strategy's
    /// choice may not take it, the less loaded of two does. `None` if none
    /// may. `instances` is not empty.
    fn choose_in(
        &self,
        instances: &[Instance],
        conns: &FxHashMap<InstanceId, Endpoint>,
        avoid: Option<InstanceId>,
        hashed: Option<(&[u8], &TierTable)>,
    ) -> Option<usize> {
        let stats = |i: usize| conns.get(&instances[i].id).map(Endpoint::stats);
        let admitted = |i: usize| {
            self.policy
                .as_ref()
                .is_none_or(|p| p.admit(instances[i].id, stats(i)))
        };
        let usable = |i: usize| stats(i).is_none_or(EndpointStats::may_take_call) && admitted(i);
        let load = |i: usize| match conns.get(&instances[i].id) {
            _ if !usable(i) => u64::MAX,
            _ if avoid == Some(instances[i].id) => u64::MAX - 1,
            Some(ep) => ep.load(),
            None => 0,
        };
        let taken = |i: usize| usable(i) && stats(i).is_none_or(EndpointStats::take_call);
        let first = match (self.strategy, hashed) {
            (Strategy::Maglev, Some((key, table))) => table.pick(key),
            (Strategy::RoundRobin, _) => self.turns.pick(instances.len()),
            _ => None,
        };
        let avoided = |i: usize| avoid == Some(instances[i].id);
        if let Some(i) = first.filter(|&i| i < instances.len())
            && !avoided(i)
            && taken(i)
        {
            return Some(i);
        }
        let i = self.balancer.pick(instances.len(), load)?;
        if !avoided(i) && taken(i) {
            return Some(i);
        }
        // Both draws were refused (or another caller took the trial
        // first, or the draw was the instance to avoid): the first other
        // that may take it, else the one to avoid.
        let n = instances.len();
        (0..n)
            .find(|&j| !avoided(j) && taken(j))
            .or_else(|| (0..n).find(|&j| avoided(j) && taken(j)))
    }
}

/// How long a shared-memory handshake may take while another instance of
/// the service could be tried instead (a live instance answers in well
/// under a millisecond; a frozen one would keep a first call waiting for
/// the handshake's own 5 s).
const HANDSHAKE_HEDGE: Duration = Duration::from_secs(1);

/// Whether connecting failed because the instance did not answer in time.
fn is_timeout(e: &commy_shm::link::ConnectError) -> bool {
    use commy_shm::link::{ConnectError, HandshakeError};
    matches!(
        e,
        ConnectError::Connect(commy_shm::uds::ConnectError::TimedOut { .. })
            | ConnectError::Handshake {
                source: HandshakeError::Recv(commy_shm::uds::RecvError::TimedOut { .. }),
                ..
            }
    )
}

/// The failure of a call whose every instance the call policy refused.
fn refused_all(pool: &Pool) -> Status {
    Status::unavailable(format!(
        "the call policy of service '{}' admits none of its instances",
        pool.service
    ))
}

/// Counts a call that a TLS endpoint `ep` takes because shared memory failed
/// at connect (`failed`); returns the endpoint.
fn fell_back(pool: &Pool, peers: &Peers, failed: &Option<Status>, ep: Endpoint) -> Endpoint {
    if let (Some(_), Endpoint::Tls(tls)) = (failed, &ep) {
        peers.count_fallback(&pool.service, &tls.peer.addr);
    }
    ep
}

/// A pool's instances by how they are reached.
#[derive(Clone, Copy)]
enum Tier {
    /// Over shared memory.
    Local,
    /// Over TLS.
    Remote,
}

/// What [`Pool::choose_from`] chose.
enum Chosen {
    /// The tier has no instance.
    Empty,
    /// The call policy admits none of the tier's instances.
    Refused,
    /// An instance we have a live link to: the link and the instance.
    Linked(Endpoint, InstanceId),
    /// An instance to connect to first.
    Unlinked(Instance),
}

/// Keeps source `i`'s part of `pool` up to date from its watch, and drops
/// links to instances that vanished.
fn spawn_watch(runtime: &tokio::runtime::Handle, pool: &Arc<Pool>, i: usize) {
    let weak = Arc::downgrade(pool);
    let source = &pool.sources[i];
    // A pool may be made outside the runtime (`Mesh::publisher` is not
    // async): a watch registers with the runtime's reactor, so it is made
    // inside.
    let watch = {
        let _inside = runtime.enter();
        source.watch(&pool.service)
    };
    let (service, name) = (pool.service.clone(), source.name());
    let task = runtime.spawn(async move {
        let mut watch = match watch {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("cannot watch instances of {service} ({name}): {e}");
                return;
            }
        };
        while let Some(set) = std::future::poll_fn(|cx| watch.as_mut().poll_next(cx)).await {
            let Some(pool) = weak.upgrade() else { return };
            pool.change(|state| state.set_source(i, set));
        }
    });
    pool.watches.lock().push(task.abort_handle());
}
