import ControlAPI
import Dispatch
import GRPCCore
import Synchronization
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// The engine a control API speaks for: none yet while the engine starts, so
/// that the API's address is bound (and a clash refused) before any replica
/// is claimed.
public final class EngineReference: Sendable {
    private enum State {
        case starting
        /// Its sessions to the replicas are open; it claims nothing until activated.
        case standingBy(epoch: UInt64)
        /// Activation asked: claiming and resyncing, then serving.
        case activating
        case started(EngineDevice)
        case failed(String)
    }

    private let state = Mutex<State>(.starting)
    private let activationAsked = DispatchSemaphore(value: 0)
    private let resynced = Mutex<UInt64>(0)
    /// While standing by: the replicas that closed its sessions.
    private let lostWhileStandingBy = Mutex<(@Sendable () -> [String])?>(nil)
    /// Its unix sockets' paths, which an activation may rename.
    public let names: SocketNames

    public init(_ device: EngineDevice? = nil, names: SocketNames = SocketNames(listen: nil, control: nil)) {
        self.names = names
        if let device { state.withLock { $0 = .started(device) } }
    }

    /// `resyncedBytes`: what the start copied between replicas (an activation answers it).
    public func started(_ device: EngineDevice, resyncedBytes: UInt64 = 0) {
        resynced.withLock { $0 = resyncedBytes }
        state.withLock { $0 = .started(device) }
    }

    var resyncedAtStart: UInt64 { resynced.withLock { $0 } }

    /// `lost`: the replicas that closed its standby sessions since.
    public func standingBy(epoch: UInt64, lost: @escaping @Sendable () -> [String] = { [] }) {
        lostWhileStandingBy.withLock { $0 = lost }
        state.withLock { $0 = .standingBy(epoch: epoch) }
    }

    var standbyLost: [String] { isStandingBy ? (lostWhileStandingBy.withLock { $0 }?() ?? []) : [] }

    /// Until `Activate` is called (true) or `seconds` pass (false).
    public func waitForActivation(seconds: Double) -> Bool {
        activationAsked.wait(timeout: .now() + seconds) == .success
    }

    /// Moves a standing-by engine on to activating; anything else refuses, with what it is doing.
    func requestActivation() throws {
        try state.withLock { state in
            switch state {
            case .standingBy:
                state = .activating
                activationAsked.signal()
            case .activating: throw RPCError(code: .failedPrecondition, message: "this engine is being activated already")
            case .starting: throw RPCError(code: .failedPrecondition, message: "this engine is starting, not standing by")
            case .started(let device):
                throw RPCError(code: .failedPrecondition, message: "this engine serves the volume already (epoch \(device.epoch)); it is not standing by")
            case .failed(let reason): throw RPCError(code: .failedPrecondition, message: "this engine did not start: \(reason)")
            }
        }
    }

    var isStandingBy: Bool {
        if case .standingBy = state.withLock({ $0 }) { return true }
        return false
    }

    /// The start was refused: calls waiting for it get the reason at once.
    public func failed(_ reason: String) {
        state.withLock { $0 = .failed(reason) }
    }

    /// It has started (false while it claims its replicas, or when that failed).
    var isServing: Bool {
        if case .started = state.withLock({ $0 }) { return true }
        return false
    }

    /// The engine, once it has started: a call made while it claims and
    /// resyncs its replicas waits for that.
    func device() async throws -> EngineDevice {
        for _ in 0..<6000 {
            switch state.withLock({ $0 }) {
            case .started(let device): return device
            case .failed(let reason): throw RPCError(code: .unavailable, message: "the engine did not start: \(reason)")
            case .starting, .activating: try await Task.sleep(nanoseconds: 20_000_000)
            case .standingBy: throw RPCError(code: .unavailable, message: "the engine is standing by (a migration's new engine): it serves once activated")
            }
        }
        throw RPCError(code: .unavailable, message: "the engine is still starting (claiming and resyncing its replicas); try again")
    }
}

/// The paths of an engine's unix sockets. A standby engine takes those of the
/// engine before it at activation (renamed), and at exit removes only the
/// names it holds then: the ones it started with may be another standby's.
public final class SocketNames: Sendable {
    private let paths: Mutex<(listen: String?, control: String?)>

    public init(listen: String?, control: String?) {
        paths = Mutex((listen, control))
    }

    public var listen: String? { paths.withLock { $0.listen } }
    public var control: String? { paths.withLock { $0.control } }

    /// Renames the sockets to the paths given (an empty one is left as it is).
    func take(listen: String, control: String) throws {
        try paths.withLock { paths in
            for (current, next, isListener) in [(paths.listen, listen, true), (paths.control, control, false)] where !next.isEmpty {
                guard let current else { throw EngineError("it serves no unix socket to rename to \(next)") }
                guard rename(current, next) == 0 else {
                    throw EngineError("cannot rename \(current) to \(next): \(String(cString: strerror(errno)))")
                }
                if isListener { paths.listen = next } else { paths.control = next }
            }
        }
    }
}

/// The engine's side of the control API.
public struct EngineControlService: Keel_Control_V1_EngineControl.SimpleServiceProtocol {
    let engine: EngineReference

    public init(engine: EngineReference) {
        self.engine = engine
    }

    public func alive(request: Keel_Control_V1_EngineAliveRequest,
                      context: ServerContext) async throws -> Keel_Control_V1_EngineAlive {
        .with {
            $0.serving = engine.isServing
            $0.standby = engine.isStandingBy
            $0.standbyLost = engine.standbyLost
        }
    }

    public func activate(request: Keel_Control_V1_ActivateRequest,
                         context: ServerContext) async throws -> Keel_Control_V1_Activated {
        let asked = monotonicSeconds()
        try engine.requestActivation()
        let device: EngineDevice
        // Its failure is an answer, not an unreachable engine.
        do { device = try await engine.device() } catch let error as RPCError {
            throw RPCError(code: .aborted, message: error.message)
        }
        do { try engine.names.take(listen: request.listenPath, control: request.controlPath) } catch {
            throw RPCError(code: .internalError, message: "the engine serves, but its sockets cannot take their new names: \(error)")
        }
        return .with {
            $0.epoch = device.epoch
            $0.resyncedBytes = engine.resyncedAtStart
            $0.tookMicroseconds = UInt64((monotonicSeconds() - asked) * 1e6)
        }
    }

    public func status(request: Keel_Control_V1_EngineStatusRequest,
                       context: ServerContext) async throws -> Keel_Control_V1_EngineStatus {
        let device = try await engine.device()
        var status = Keel_Control_V1_EngineStatus()
        status.volume = device.volume
        status.size = device.size
        status.epoch = device.epoch
        status.clientConnections = UInt32(clamping: device.clientConnections)
        switch device.replicas.health {
        case .healthy: status.health = .ok
        case .degraded: status.health = .degraded
        case .faulted: status.health = .faulted
        }
        status.replicas = device.replicas.replicas.filter { $0.mode != .removed }.map { state in
            var replica = Keel_Control_V1_ReplicaState()
            replica.address = "\(state.address)"
            replica.id = state.id
            replica.mode = state.mode.rawValue
            replica.epoch = device.epoch
            replica.error = state.reason
            replica.rebuiltBytes = state.mode == .rw ? device.size : state.rebuiltBytes
            replica.rebuildProgress = device.size == 0 ? 1 : Double(replica.rebuiltBytes) / Double(device.size)
            return replica
        }
        let counters = device.counters
        status.io = .with {
            $0.reads = counters.reads.load(ordering: .relaxed)
            $0.writes = counters.writes.load(ordering: .relaxed)
            $0.readBytes = counters.readBytes.load(ordering: .relaxed)
            $0.writtenBytes = counters.writtenBytes.load(ordering: .relaxed)
            $0.flushes = counters.flushes.load(ordering: .relaxed)
            $0.errors = counters.errors.load(ordering: .relaxed)
        }
        return status
    }

    public func addReplica(request: Keel_Control_V1_AddReplicaRequest,
                           context: ServerContext) async throws -> Keel_Control_V1_EngineStatus {
        let addresses = try ([request.address] + request.togetherWith).map(parse)
        let device = try await engine.device()
        // Adding talks to the replicas with blocking calls: off the cooperative pool.
        try await offThePool { try refusing { try device.addReplicas(addresses) } }
        return try await status(request: .init(), context: context)
    }

    public func removeReplica(request: Keel_Control_V1_RemoveReplicaRequest,
                              context: ServerContext) async throws -> Keel_Control_V1_EngineStatus {
        let address = try parse(request.address)
        let device = try await engine.device()
        // Removing a replica being rebuilt waits for the copy thread.
        try await offThePool { try refusing { try device.removeReplica(address: address) } }
        return try await status(request: .init(), context: context)
    }

    public func createSnapshot(request: Keel_Control_V1_CreateSnapshotRequest,
                               context: ServerContext) async throws -> Keel_Control_V1_Snapshots {
        let device = try await engine.device()
        // Holding writes and the replicas' syncs block: off the cooperative pool.
        let snapshots = try await offThePool { try refusing { try device.createSnapshot(name: request.name) } }
        return .with { $0.snapshots = snapshots }
    }

    public func removeSnapshot(request: Keel_Control_V1_RemoveSnapshotRequest,
                               context: ServerContext) async throws -> Keel_Control_V1_Snapshots {
        let device = try await engine.device()
        // The replicas' merges copy data and block: off the cooperative pool.
        let snapshots = try await offThePool { try refusing { try device.removeSnapshot(name: request.name) } }
        return .with { $0.snapshots = snapshots }
    }

    public func revertSnapshot(request: Keel_Control_V1_RevertSnapshotRequest,
                               context: ServerContext) async throws -> Keel_Control_V1_Snapshots {
        let device = try await engine.device()
        // A host's device is a client too: its frontend's connections.
        let attached = device.clientConnections > 0 ? "\(device.clientConnections) NBD client connection(s)" : nil
        let snapshots = try await offThePool {
            try refusing { try device.revertSnapshot(name: request.name, discardNewer: request.discardNewer, attached: attached) }
        }
        return .with { $0.snapshots = snapshots }
    }

    public func listSnapshots(request: Keel_Control_V1_ListSnapshotsRequest,
                              context: ServerContext) async throws -> Keel_Control_V1_Snapshots {
        let device = try await engine.device()
        let snapshots = try await offThePool { try refusing { try device.listSnapshots() } }
        return .with { $0.snapshots = snapshots }
    }

    private func parse(_ text: String) throws -> Syscalls.SocketAddress {
        do { return try Syscalls.SocketAddress(parsing: text) } catch {
            throw RPCError(code: .invalidArgument, message: "\(error)")
        }
    }

    private func refusing<T>(_ body: () throws -> T) throws -> T {
        do { return try body() } catch {
            throw RPCError(code: .failedPrecondition, message: "\(error)")
        }
    }
}
