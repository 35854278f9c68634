// Types of @commy/node. The public API (Mesh and the classes it returns) is
// declared here by hand; the native layer under it (NativeMesh,
// NativeRegion) is appended by napi-rs from the Rust source. Regenerate
// with `cargo xtask npm`; the test run fails if index.d.ts is stale.

/** A status name, as set on `CommyError.code`. */
export type Code =
  | 'CANCELLED'
  | 'INVALID_ARGUMENT'
  | 'DEADLINE_EXCEEDED'
  | 'NOT_FOUND'
  | 'ALREADY_EXISTS'
  | 'PERMISSION_DENIED'
  | 'RESOURCE_EXHAUSTED'
  | 'FAILED_PRECONDITION'
  | 'ABORTED'
  | 'INTERNAL'
  | 'UNAVAILABLE'
  | 'UNAUTHENTICATED'

/** Every status name `CommyError.code` can take. */
export declare const codes: readonly Code[]

/** An error from the mesh; `code` names the status. */
export declare class CommyError extends Error {
  constructor(code: Code, message: string)
  readonly name: 'CommyError'
  readonly code: Code
}

/** What a payload may be given as (strings are sent as UTF-8). */
export type Payload = Buffer | Uint8Array | ArrayBuffer | string

/** Options of `Mesh.open`. */
/**
 * Options of `Mesh.open`: the mesh's settings, each by its key in camelCase
 * (a duration's with `Ms`, in milliseconds). Unset ones come from
 * `$COMMY_<KEY>` and the config file; `mesh.explain(name)` says where each
 * value came from.
 */
export interface MeshOptions {
  /** The mesh to join (`'default'` unless set). */
  mesh?: string
  /** Where the mesh's sockets live (`$COMMY_RUNTIME_DIR`, `$XDG_RUNTIME_DIR/commy` or `/tmp/commy-<uid>` unless set). */
  runtimeDir?: string
  /** Timeout of calls that set none, in milliseconds (30 000 unless set; 0 waits forever). */
  defaultTimeoutMs?: number
  /** How long a call polls for its answer before it sleeps, in milliseconds (0 unless set: calls from JS share the runtime). */
  callSpinMs?: number
  /** Requests one service instance handles at once (1024 unless set). */
  maxConcurrency?: number
  /** How long a publisher waits for a subscriber that takes nothing before it disconnects it as too slow, in milliseconds (1000 unless set). */
  subscriberStallMs?: number
  /** Serve over TLS at `tls://ADDR:PORT` (port 0: one the system picks). */
  listen?: string
  /** Processes (`tls://HOST:PORT`) whose instances may be called. */
  peers?: string[]
  /** The CA (PEM file) certificates must chain to (the per-user dev CA unless set). */
  tlsCa?: string
  /** This process's certificate chain (PEM file). */
  tlsCert?: string
  /** This process's private key (PEM file). */
  tlsKey?: string
  /** mTLS: refuse clients without a certificate from the CA. */
  requireClientCert?: boolean
  /** Which transport calls use: `'auto'` (the default), `'shm'` or `'tls'`. */
  transport?: 'auto' | 'shm' | 'tls'
  /**
   * How pools pick an instance: `'STRATEGY'` entries for every service,
   * `'SERVICE=STRATEGY'` for one: `p2c` (the default: the less loaded of
   * two), `round_robin`, `maglev` (consistent hashing on `hashKey`).
   */
  balance?: string[]
  /** Failures in a row that eject an instance from its pool for a while (5 unless set; 0: no run ejects, and with `ejectSuccessPercent` at 0 too, nothing does). */
  ejectAfter?: number
  /** An instance of which fewer than this share of calls (in percent) succeeded over 10 s from a failure is ejected (50 unless set; 0: never). */
  ejectSuccessPercent?: number
  /** Calls those 10 s must have seen before their success rate ejects (20 unless set). */
  ejectMinCalls?: number
  /** How long a first ejection lasts, in milliseconds (30 000 unless set; the n-th lasts n times as long, at most 10 times). */
  ejectionTimeMs?: number
  /** The most of a pool ejected at once, in percent (10 unless set; one instance always may be). */
  maxEjectedPercent?: number
  /** Calls to one service this handle may have waiting at once; one more fails at once with `RESOURCE_EXHAUSTED` (0 unless set: no limit). */
  maxPending?: number
  /** Attempts in all of a call that may be retried (3 unless set; 1: never retry). */
  retryAttempts?: number
  /** Retries may add this share of the requests of the last 10 s, in percent, plus 10 a second (20 unless set). */
  retryBudgetPercent?: number
  /** Services whose calls may be retried after any failure of the instance, not only one that never reached it. */
  idempotent?: string[]
  /**
   * Hedged calls: `'DELAY'` for every service, `'SERVICE=DELAY'` for one
   * (like `'5ms'`): an idempotent call still unanswered after `DELAY` is
   * sent to a second instance too, and the first answer wins.
   */
  hedge?: string[]
}

/** Options of `mesh.call`. */
export interface CallOptions {
  /** Give up after this many milliseconds (`DEADLINE_EXCEEDED`); 0 waits forever. */
  timeoutMs?: number
  /**
   * The call may be made more than once: after a failure of the instance
   * that took it, it is tried again on another (within the retry budget and
   * the timeout), as the calls of the services the `idempotent` option
   * names are. A call that never reached an instance is tried again either
   * way.
   */
  idempotent?: boolean
  /**
   * For a service balanced by consistent hashing (`balance: ['SERVICE=maglev']`):
   * calls with the same key go to the same instance, from every process and SDK.
   */
  hashKey?: Payload
}

/** One instance of a service as a handle's pool sees it (`mesh.endpoints`). */
export interface Endpoint {
  /** The instance's id. */
  instance: string
  /** Where it is reached: a socket path on this host, or `tls://HOST:PORT`. */
  endpoint: string
  /** Whether this handle has a live link to it (it has been called). */
  linked: boolean
  /** In its pool, ejected for failing, or half-open (trial calls decide). */
  state: 'in' | 'ejected' | 'half-open'
  /** While in: its failures in a row. */
  failuresInARow: number
  /** While ejected: for how many milliseconds still. */
  ejectedForMs?: number | null
  /** Times it was ejected. */
  ejections: number
  /** Calls sent to it and not answered yet. */
  inFlight: number
  /** Its failed calls that count against it (unavailable, internal, deadline exceeded, a broken link). */
  failedCalls: number
  /** Over TLS: the peak-EWMA estimate of its round trip, in milliseconds. */
  roundTripMs?: number | null
}

/** What a subscriber that falls behind meets (see `SubscribeOptions.policy`). */
export type SlowPolicy = 'block' | 'drop-oldest' | 'disconnect'

/** Options of `mesh.subscribe`. */
export interface SubscribeOptions {
  /** Join this queue group: each message goes to one member of the group. */
  group?: string
  /** Messages held before the policy applies (1 to 1,048,576; 1024 unless set). */
  queue?: number
  /**
   * What happens when this subscriber falls behind: `'block'` (the default)
   * makes publishers wait, and disconnects it if it takes nothing for the
   * stall time; `'drop-oldest'` discards the oldest message held;
   * `'disconnect'` ends the subscription once `queue` messages wait.
   */
  policy?: SlowPolicy
  /**
   * How long a `'block'` subscriber that keeps up with a dense stream
   * (messages less than half a microsecond apart) waits after it sees a
   * message, to take what comes meanwhile with it, in microseconds (1
   * unless set, at most 100, 0: never): reading right behind a fast
   * publisher slows the publisher more than the wait costs. Request-reply
   * traffic and sparse streams never wait.
   */
  lingerUs?: number
}

/** Options of `mesh.region`. */
export interface RegionOptions {
  /** Size of the data area in bytes: required to create, checked when opening. */
  size?: number
  /** `'openOrCreate'` (the default with a size), `'create'` or `'open'` (the default without). */
  create?: 'open' | 'create' | 'openOrCreate'
}

/**
 * Who sent a request, as its transport vouches for it. `'local'`: a process
 * of this host, over shared memory (`uid`, `gid`, `pid`, from the kernel);
 * `'remote'`: a process of another host, over TLS (`identity`, `addr`).
 * The fields of the other kind are `null`.
 */
export interface Caller {
  /** `'unknown'` only for a kind of caller this version does not know. */
  readonly kind: 'local' | 'remote' | 'unknown'
  /** A local caller's effective user id. */
  readonly uid: number | null
  /** A local caller's effective group id. */
  readonly gid: number | null
  /** A local caller's process id (0 if it lives in another pid namespace). */
  readonly pid: number | null
  /** A remote caller's SPIFFE ID (`spiffe://<mesh>/<service>`); `null` if it presented no client certificate. */
  readonly identity: string | null
  /** A remote caller's address, `'IP:PORT'`. */
  readonly addr: string | null
}

/** What a handler gets with each request, as its second argument. */
export interface HandlerContext {
  /**
   * Fires (with a `CANCELLED` CommyError as its reason) if the caller gives up
   * before the answer. Only for a handler that declares the second parameter:
   * for one that does not, it never fires.
   */
  readonly signal: AbortSignal
  /** Who sent the request. */
  readonly caller: Caller
}

/**
 * A service handler: gets the request body, returns (or resolves to) the
 * reply. Declaring the second parameter asks for a cancellation signal.
 */
export type Handler = (request: Buffer, context: HandlerContext) => Payload | void | Promise<Payload | void>

/** A handle on the mesh. */
export declare class Mesh {
  private constructor()
  /** Opens a mesh handle. */
  static open(options?: MeshOptions): Promise<Mesh>
  /** Calls service `name`; resolves to the reply. */
  call(name: string, payload: Payload, options?: CallOptions): Promise<Buffer>
  /** Sends a one-way message to one instance of service `name`. */
  send(name: string, payload: Payload): Promise<void>
  /** Publishes on `topic`; resolves to the number of deliveries. */
  publish(topic: string, payload: Payload): Promise<number>
  /**
   * Calls service `name` once with each of `payloads`, all in flight at
   * once; resolves to each call's reply or error (in its place, not
   * thrown), in order.
   */
  callMany(name: string, payloads: Iterable<Payload>, options?: CallOptions): Promise<Array<Buffer | CommyError>>
  /**
   * Publishes each of `payloads` on `topic`, in order, as one burst (each
   * subscriber gets them all in this order); resolves to the deliveries
   * made, summed over the messages.
   */
  publishMany(topic: string, payloads: Iterable<Payload>): Promise<number>
  /**
   * A publisher of `topic`: each message goes where `publish` sends it,
   * with the topic checked and its subscribers' links found once, not on
   * every publish. Throws INVALID_ARGUMENT for a bad topic name.
   */
  publisher(topic: string): Publisher
  /**
   * Messages this handle published on `topic` that subscribers on this
   * host discarded unread under `'drop-oldest'` (each discarded copy counts
   * once; subscribers at TLS peers are not counted).
   */
  droppedBySubscribers(topic: string): number
  /** How many subscribers a publish on `topic` would reach now (one per queue group). */
  subscribers(topic: string): Promise<number>
  /**
   * Waits until a publish on `topic` would reach `n` (default 1)
   * subscribers; resolves to how many it would. Rejects with
   * DEADLINE_EXCEEDED after `options.timeoutMs` (30,000 by default).
   */
  waitForSubscribers(topic: string, n?: number, options?: { timeoutMs?: number }): Promise<number>
  /**
   * Serves `name` with `handler`. A handler that throws answers `INTERNAL`
   * (or the status named by the thrown error's `code`); the service keeps serving.
   */
  serve(name: string, handler: Handler): Promise<Service>
  /** Subscribes to `topic`: an async iterable of message payloads. */
  subscribe(topic: string, options?: SubscribeOptions): Promise<Subscription>
  /** Opens (or creates) the shared region `name` of this mesh. */
  region(name: string, options?: RegionOptions): Region
  /**
   * The value of a setting this mesh opened with and where it came from
   * (`['64', 'Node options']`, `['"50us"', 'default']`); `name` is an option
   * name (`maxConcurrency`) or a settings key (`max_concurrency`); null
   * for an unknown one.
   */
  explain(name: string): [string, string] | null
  /**
   * Every instance of service `name` this handle knows, as its pool sees
   * it: where it is, whether it is in, ejected or half-open, its calls in
   * flight, failures and round-trip estimate.
   */
  endpoints(name: string): Endpoint[]
  /** Stops serving (after requests in progress are answered), ends subscriptions, drops links. */
  close(): Promise<void>
}

/** A service this process serves. */
export declare class Service {
  private constructor()
  /** The service name. */
  readonly name: string
  /**
   * Drains the instance and stops it: it leaves discovery, its clients send
   * their new calls to other instances, and what they sent before is
   * answered; resolves then.
   */
  close(): Promise<void>
}

/** A subscription: `for await (const msg of sub)` yields each message's payload. */
export declare class Subscription implements AsyncIterableIterator<Buffer> {
  private constructor()
  /** The topic. */
  readonly topic: string
  /** The queue group, if any. */
  readonly group: string | undefined
  /**
   * Messages dropped because this subscriber fell behind: discarded under
   * `'drop-oldest'`, refused under `'disconnect'`, or lost when a publisher
   * disconnected it for taking nothing for the stall time.
   */
  readonly dropped: number
  /** Why the mesh ended this subscription (a `RESOURCE_EXHAUSTED` CommyError), or null. */
  readonly endReason: CommyError | null
  next(): Promise<IteratorResult<Buffer, undefined>>
  /** A queued message, without waiting; `undefined` when none is queued (or it ended). */
  tryNext(): Buffer | undefined
  /**
   * The messages that have come, up to `max` (default 64), in order; if none
   * has, waits for the next and takes what came with it. `[]` once ended.
   */
  nextBatch(max?: number): Promise<Buffer[]>
  return(): Promise<IteratorResult<Buffer, undefined>>
  /** Ends the subscription; a waiting `next()` resolves with `done: true`. */
  close(): void
  [Symbol.asyncIterator](): Subscription
}

/** A publisher of one topic, made by `mesh.publisher(topic)`. */
export declare class Publisher {
  private constructor()
  /** The topic it publishes on. */
  readonly topic: string
  /** Publishes `payload`; resolves to the number of deliveries. */
  publish(payload: Payload): Promise<number>
  /**
   * Publishes each of `payloads` in order, as one burst; resolves to the
   * deliveries made, summed over the messages.
   */
  publishMany(payloads: Iterable<Payload>): Promise<number>
}

/**
 * A named shared-memory region. `read` and `write` copy, under the region's
 * consistency protocol: a read never sees half of a concurrent write.
 */
export declare class Region {
  private constructor()
  /** The region's name. */
  readonly name: string
  /** The size of its data area in bytes. */
  readonly size: number
  /** A copy of `length` bytes at `offset` (default: from `offset` to the end). */
  read(offset?: number, length?: number): Buffer
  /** Writes `data` at `offset` (default 0). */
  write(data: Payload, offset?: number): void
  /** Lets go of the region (removed when its last holder lets go, unless it has a TTL). */
  close(): void
}

// ---- The native layer (generated by napi-rs from commy-node/src) ----
