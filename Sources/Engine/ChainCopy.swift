import ControlAPI
import GRPCCore
import LibNBD
import Logging
import ReplicaIdentity
import Syscalls

/// A replica being added gets the volume's snapshots, layer by layer, before
/// it joins: a rebuilt replica holds the same chain as its peers, not a
/// flattened copy. Its own old snapshots (a stale replica's) are merged away
/// first. Then, oldest first, each snapshot is copied from an RW replica's
/// read-only snapshot session into the new replica's head (the oldest in
/// full, each later one only where `keel:changed:<previous>` says it
/// changed), and the head is frozen under the snapshot's name. The rebuild
/// then copies only what changed since the newest snapshot.
struct ChainCopy {
    let device: EngineDevice
    let target: SocketAddress
    let targetControl: ReplicaControlClient
    let targetSnapshots: [String]
    let logger: Logger

    /// Copies the chain; returns the newest snapshot's name (nil: the volume has none).
    func run() throws -> String? {
        guard let source = device.replicas.replicas.first(where: { $0.mode == .rw }) else {
            throw EngineError("no replica is healthy to copy the snapshots from")
        }
        let sourceSnapshots = try ReplicaControlClient(address: source.controlAddress).call(timeout: device.replicaTimeoutSeconds) {
            try await $0.status(.init(), options: $1)
        }.snapshots.map(\.name)
        let owner = device.ownerMessage
        for name in targetSnapshots {
            try controlCall("remove its old snapshot \(name)", timeout: mergeTimeout) {
                _ = try await $0.mergeSnapshot(.with { $0.owner = owner; $0.name = name }, options: $1)
            }
        }
        var previous: String?
        for name in sourceSnapshots {
            let changed = previous.map { ChangedBlocksContext.name(since: $0) }
            let reader = try RegionCopier.connect(changedContext: changed) { client in
                try client.setExportName(SnapshotExportName(volume: device.volume, snapshot: name).description)
                try client.connect(to: source.address)
            }
            let writer = try RegionCopier.connect { try device.open($0, address: target) }
            let copier = RegionCopier(source: reader, targets: [writer], timeoutSeconds: device.replicaTimeoutSeconds * 4,
                                      changedContext: changed)
            var copied: UInt64 = 0
            for offset in stride(from: 0, to: device.size, by: Int(Self.piece)) {
                copied += try copier.copy(offset: offset, length: min(Self.piece, device.size - offset))
            }
            try writer.flush()
            try? reader.shutdown()
            try? writer.shutdown()
            for prepare in [true, false] {
                try controlCall("freeze snapshot \(name)", timeout: device.replicaTimeoutSeconds * 2) {
                    _ = try await $0.freezeHead(.with { $0.owner = owner; $0.name = name; $0.prepare = prepare }, options: $1)
                }
            }
            logger.notice("replica \(target) got snapshot \(name) (\(copied) bytes of data copied)")
            previous = name
        }
        let held = try targetControl.call(timeout: mergeTimeout) { try await $0.status(.init(), options: $1) }.snapshots
        guard held.map(\.name) == sourceSnapshots, !held.contains(where: \.unsealed) else {
            throw EngineError("replica \(target) holds snapshots \(held.map(\.name)) (unsealed: "
                              + "\(held.filter(\.unsealed).map(\.name))) after the copy of \(sourceSnapshots)")
        }
        return previous
    }

    /// What one copy call covers (each has the replica timeout, times four).
    static let piece: UInt64 = 64 << 20

    private var mergeTimeout: Double { max(device.replicaTimeoutSeconds * 4, Double(device.size) / 20e6) }

    private func controlCall(_ what: String, timeout: Double,
                             _ body: @escaping @Sendable (ReplicaControlClient.Stub, CallOptions) async throws -> Void) throws {
        do { _ = try targetControl.call(timeout: timeout, body) as Void } catch {
            throw EngineError("replica \(target) could not \(what): \(error)")
        }
    }
}
