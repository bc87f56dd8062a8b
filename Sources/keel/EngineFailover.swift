import ControlAPI
import DeviceFrontend
import Foundation
import GRPCCore
import Logging
import Synchronization
import Syscalls

/// Where a device frontend gets a new engine when its engine stops
/// answering: through the node agents of the volume's engine nodes, the one
/// it ran on first (restarted where it was, if that node answers), then the
/// others in their order. The new engine claims the replicas with a newer
/// epoch, which fences the old one wherever it still runs.
final class EngineFailover: Sendable {
    struct Spec: Sendable {
        var volume: String
        var volumeID: String
        var replicas: [String]
        var port: UInt32
        var replicaTimeout: Double
    }

    private let nodes: [String]
    private let spec: Spec
    private let logger: Logger
    /// The volume's size, known once the device is attached.
    private let size = Atomic<UInt64>(0)
    /// Once cancelled (the frontend stops), no call starts and the one under way ends.
    private let calls = Mutex<(cancelled: Bool, current: Task<Void, Never>?)>((false, nil))

    init(nodes: [String], spec: Spec, logger: Logger) {
        self.nodes = nodes
        self.spec = spec
        self.logger = logger
    }

    func deviceAttached(size: UInt64) { if size > 0 { self.size.store(size, ordering: .relaxed) } }

    /// The frontend stops: a start under way (up to minutes) must not hold it.
    func cancel() {
        calls.withLock { calls in
            calls.cancelled = true
            calls.current?.cancel()
        }
    }

    private var isCancelled: Bool { calls.withLock { $0.cancelled } }

    private func call<T: Sendable>(_ node: String, doing what: String,
                                   _ body: @escaping @Sendable (NodeStub) async throws -> T) throws -> T {
        defer { calls.withLock { $0.current = nil } }
        return try callNode(node, doing: what, started: { task in
            calls.withLock { calls in
                calls.current = task
                if calls.cancelled { task.cancel() }
            }
        }, body)
    }

    /// The engine that serves the volume now, or nil when no node could start one.
    /// Without a lost engine (the first attach), the nodes in their order.
    func engine(replacing lost: EngineEndpoint?, failure: String = "") -> EngineEndpoint? {
        for node in lost.map(ordered(after:)) ?? nodes {
            if isCancelled { return nil }
            // A node that does not answer at once is down or cut off: the next one.
            guard (try? call(node, doing: "report its health", { try await $0.health(.init(), options: .timeout(seconds: 3)) })) != nil else {
                logger.warning("engine node \(node) does not answer; trying the next")
                continue
            }
            do {
                let request = Keel_Control_V1_StartEngineRequest.with {
                    $0.volume = spec.volume
                    $0.volumeID = spec.volumeID
                    $0.size = size.load(ordering: .relaxed)
                    $0.replicas = spec.replicas
                    $0.port = spec.port
                    $0.replicaTimeout = spec.replicaTimeout
                }
                let started = try call(node, doing: "start the engine of \(spec.volume)") {
                    try await $0.startEngine(request, options: .timeout(seconds: 150))
                }
                let address = try Syscalls.SocketAddress(parsing: started.address)
                logger.notice("engine of \(spec.volume) \(started.alreadyRunning ? "runs" : "started") on node \(node) at \(address), epoch \(started.epoch)")
                return EngineEndpoint(address: address, exportName: spec.volume)
            } catch {
                logger.warning("engine node \(node) could not start the engine: \((error as? CLIError)?.message ?? "\(error)")")
            }
        }
        if isCancelled { return nil }
        logger.error("no engine node of \(spec.volume) could start its engine (\(nodes.joined(separator: ", "))); trying again")
        return nil
    }

    /// The node whose host the lost engine listened on first, then the rest in order.
    private func ordered(after lost: EngineEndpoint) -> [String] {
        guard case .tcp(let host, _) = lost.address,
              let current = nodes.firstIndex(where: { (try? Syscalls.SocketAddress(parsing: $0)).map(Self.host) == host }) else {
            return nodes
        }
        return Array(nodes[current...] + nodes[..<current])
    }

    private static func host(_ address: Syscalls.SocketAddress) -> String? {
        if case .tcp(let host, _) = address { return host }
        return nil
    }
}
