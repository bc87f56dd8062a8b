import ControlAPI
import Foundation
import GRPCCore
import Logging
import ReplicaIdentity
import Syscalls

/// The engine's control-plane thread: runs the `KeeperCycle` whenever the
/// I/O threads or the replica set poke it, and ticks its idle clock once a
/// second, over the replicas' gRPC control API.
final class MetadataKeeper: @unchecked Sendable {
    private let cycle: KeeperCycle
    private let condition = NSCondition()
    private var poked = false
    private var stopping = false
    private var thread: PosixThread?

    init(device: EngineDevice, logger: Logger) {
        cycle = KeeperCycle(gate: device.gate, replicas: device.replicas, metadata: ControlAPIMetadata(device: device),
                            epoch: device.epoch, logger: logger) { [unowned device] in device.wakeWorkers() }
        let slow = device.faults.slowMembershipSeconds
        if slow > 0 { cycle.beforeMembership = { usleep(UInt32(slow * 1e6)) } }
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
        cycle.persistMembership()
        cycle.clearEverything()
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

            cycle.persistMembership()
            cycle.markRequested()
            if clock.now >= nextTick {
                nextTick = clock.now.advanced(by: second)
                cycle.tick()
            }
        }
    }
}

/// `ReplicaMetadata` over each replica's gRPC control API, calls to several
/// replicas in flight at once, each bounded by the replica timeout.
final class ControlAPIMetadata: ReplicaMetadata {
    private unowned let device: EngineDevice
    private var clients: [Int: ReplicaControlClient] = [:]

    init(device: EngineDevice) {
        self.device = device
    }

    func run(_ call: MetadataCall, on indexes: [Int]) -> [Int: MetadataAnswer] {
        let body = request(call)
        let replicas = device.replicas.replicas
        var answers: [Int: MetadataAnswer] = [:]
        var calls: [(Int, Handoff<Result<Void, Error>>)] = []
        for index in indexes {
            do {
                calls.append((index, try client(index, replicas[index].controlAddress)
                    .start(timeout: device.replicaTimeoutSeconds, body)))
            } catch {
                answers[index] = .failed("\(error)")
            }
        }
        for (index, call) in calls {
            switch call.take() {
            case .success:
                answers[index] = .done
            case .failure(let error as RPCError) where error.code == .permissionDenied:
                answers[index] = .notOwner
            case .failure(let error):
                answers[index] = .failed("\(error)")
            }
        }
        return answers
    }

    private func request(_ call: MetadataCall) -> @Sendable (ReplicaControlClient.Stub, CallOptions) async throws -> Void {
        let owner = device.ownerMessage
        switch call {
        case .markDirty(let spans):
            let request = dirtyRanges(spans, owner: owner)
            return { stub, options in _ = try await stub.markDirty(request, options: options) }
        case .clearDirty(let spans):
            let request = dirtyRanges(spans, owner: owner)
            return { stub, options in _ = try await stub.clearDirty(request, options: options) }
        case .setMembership(let generation, let members):
            let update = Keel_Control_V1_MembershipUpdate.with {
                $0.owner = owner
                $0.membership = .with {
                    $0.epoch = device.epoch
                    $0.generation = generation
                    $0.members = members
                }
            }
            return { stub, options in _ = try await stub.setMembership(update, options: options) }
        }
    }

    private func dirtyRanges(_ spans: [ByteRange], owner: Keel_Control_V1_Owner) -> Keel_Control_V1_DirtyRanges {
        .with { request in
            request.owner = owner
            request.ranges = spans.map { span in .with { $0.offset = span.offset; $0.length = span.length } }
        }
    }

    private func client(_ index: Int, _ address: SocketAddress) throws -> ReplicaControlClient {
        if let client = clients[index] { return client }
        let client = try ReplicaControlClient(address: address)
        clients[index] = client
        return client
    }
}
