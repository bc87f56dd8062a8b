import ControlAPI
import Foundation
import GRPCCore
import Logging
import Syscalls

/// The engine's control-plane thread: keeps what the replicas record about the
/// volume in step with the engine. It
/// - marks regions dirty on every writable replica before writes go there,
/// - clears regions that have been idle for a few seconds,
/// - persists each new membership generation on the writable replicas
///   (acknowledgements wait for it, see `ReplicaSet`),
/// and wakes the I/O threads whenever one of those lets writes go on.
/// A replica whose control API fails a call is failed like one that fails I/O.
final class MetadataKeeper: @unchecked Sendable {
    private unowned let device: EngineDevice
    private let logger: Logger
    private let condition = NSCondition()
    private var poked = false
    private var stopping = false
    private var thread: PosixThread?
    private var clients: [Int: ReplicaControlClient] = [:]
    /// Clearing waits this many idle seconds, so that busy regions are not marked and cleared in turn.
    private let idleTicks: UInt32 = 3

    init(device: EngineDevice, logger: Logger) {
        self.device = device
        self.logger = logger
    }

    func start() throws {
        thread = try PosixThread(name: "keel-keeper") { [self] in run() }
    }

    /// Something changed: marks to make, a membership to persist.
    func poke() {
        condition.lock()
        poked = true
        condition.signal()
        condition.unlock()
    }

    /// After the I/O threads have stopped: clears every dirty region, since
    /// every write has been answered by every writable replica.
    func stop() {
        condition.lock()
        stopping = true
        condition.signal()
        condition.unlock()
        thread?.join()
        persistMembership()
        clear(device.gate.beginClearing(idleTicks: 0))
    }

    /// The idle clock ticks on a monotonic clock: a wall clock set back would
    /// stop clears, one set forward would clear regions early.
    private func run() {
        let clock = ContinuousClock()
        let second = Duration.seconds(1)
        var nextTick = clock.now.advanced(by: second)
        while true {
            condition.lock()
            while !poked && !stopping && clock.now < nextTick {
                let left = clock.now.duration(to: nextTick)
                _ = condition.wait(until: Date(timeIntervalSinceNow: Double(left.components.seconds)
                                                 + Double(left.components.attoseconds) / 1e18))
            }
            poked = false
            let done = stopping
            condition.unlock()
            if done { return }

            persistMembership()
            mark(device.gate.takeRegionsToMark())
            if clock.now >= nextTick {
                nextTick = clock.now.advanced(by: second)
                device.gate.tick()
                clear(device.gate.beginClearing(idleTicks: idleTicks))
            }
        }
    }

    // MARK: - Calls to the replicas

    /// Marks regions on every writable replica; a replica that fails the call
    /// is failed (so every writable one left has the marks). Fenced, nothing is
    /// marked: the parked writes are woken and answered EIO.
    private func mark(_ regions: [Int]) {
        guard !regions.isEmpty else { return }
        let request = dirtyRanges(regions)
        onWritableReplicas("cannot mark dirty regions") { stub, options in
            _ = try await stub.markDirty(request, options: options)
        }
        if !device.replicas.isFenced { device.gate.marked(regions) }
        device.wakeWorkers()
    }

    private func clear(_ regions: [Int]) {
        guard !regions.isEmpty else { return }
        let request = dirtyRanges(regions)
        onWritableReplicas("cannot clear dirty regions") { stub, options in
            _ = try await stub.clearDirty(request, options: options)
        }
        device.gate.cleared(regions, succeeded: true)
        device.wakeWorkers()
    }

    /// Persists generations until the newest is on every writable replica
    /// (a replica that fails this is failed, which makes a newer generation).
    private func persistMembership() {
        for _ in 0...ReplicaSet.capacity {
            guard device.replicas.holdsAcknowledgements else { return }
            if device.faults.slowMembershipSeconds > 0 {
                usleep(UInt32(device.faults.slowMembershipSeconds * 1e6))
            }
            let (generation, members) = device.replicas.membership
            let update = Keel_Control_V1_MembershipUpdate.with {
                $0.owner = device.ownerMessage
                $0.membership = .with {
                    $0.epoch = device.epoch
                    $0.generation = generation
                    $0.members = members
                }
            }
            let failed = onWritableReplicas("cannot record the membership") { stub, options in
                _ = try await stub.setMembership(update, options: options)
            }
            if !failed {
                logger.info("membership \(device.epoch).\(generation): \(members.count) replica(s) in sync")
                device.replicas.persisted(generation: generation)
                device.wakeWorkers()
                return
            }
        }
    }

    /// Runs a call on every writable replica at once; fails those that fail it.
    /// Returns whether any failed.
    @discardableResult
    private func onWritableReplicas(_ what: String,
                                    _ body: @escaping @Sendable (ReplicaControlClient.Stub, CallOptions) async throws -> Void) -> Bool {
        // A fenced engine asks nothing of replicas that belong to another engine now.
        guard !device.replicas.isFenced else { return true }
        let targets = device.replicas.replicas.enumerated().filter { $0.element.mode.isWritable }
        var calls: [(Int, Handoff<Result<Void, Error>>)] = []
        for (index, replica) in targets {
            do {
                let client = try client(index, replica.controlAddress)
                calls.append((index, client.start(timeout: device.replicaTimeoutSeconds, body)))
            } catch {
                device.replicas.fail(index, reason: "\(what): \(error)")
            }
        }
        var failed = calls.count < targets.count
        for (index, call) in calls {
            guard case .failure(let error) = call.take() else { continue }
            failed = true
            if let rpc = error as? RPCError, rpc.code == .permissionDenied {
                device.replicas.fence(by: index)
            } else {
                device.replicas.fail(index, reason: "\(what): \(error)")
            }
        }
        return failed
    }

    private func client(_ index: Int, _ address: SocketAddress) throws -> ReplicaControlClient {
        if let client = clients[index] { return client }
        let client = try ReplicaControlClient(address: address)
        clients[index] = client
        return client
    }

    private func dirtyRanges(_ regions: [Int]) -> Keel_Control_V1_DirtyRanges {
        var request = Keel_Control_V1_DirtyRanges()
        request.owner = device.ownerMessage
        request.ranges = regions.map { region in
            let range = device.gate.range(of: region)
            return .with { $0.offset = range.offset; $0.length = range.length }
        }
        return request
    }
}
