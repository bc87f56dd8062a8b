import IOUring
import LibNBD
import Logging
import NBDProtocol
import NBDServer
import ReplicaIdentity
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// A volume as of one snapshot, read from its replicas' read-only snapshot
/// sessions (`<volume>@snapshot:<name>`), which claim nothing and fence no
/// engine: what `keel snapshot export` serves. Reads go to one replica and
/// move on to the next when it fails or stays silent past `timeoutSeconds`;
/// BLOCK_STATUS is answered by a replica from its layer maps.
public final class SnapshotReader: BlockDevice, @unchecked Sendable {
    public let size: UInt64
    public let exportName: SnapshotExportName
    public let replicas: [SocketAddress]
    /// The changed-blocks context served (`keel:changed:<older>`), with this export's id: one, since a
    /// replica answers one context besides `base:allocation` per connection, and the links are shared.
    public let changedContexts: [MetaContextOffer]
    let timeout: UInt64
    let logger: Logger

    public var readOnly: Bool { true }
    public var alignment: Int { 1 }

    /// `changedSince`: the older snapshot whose changed-blocks view is served (none when it is not older than this one).
    public init(exportName: SnapshotExportName, size: UInt64, replicas: [SocketAddress], olderSnapshots: [String],
                changedSince: String?, timeoutSeconds: Double = 8, logger: Logger) {
        precondition(!replicas.isEmpty)
        self.exportName = exportName
        self.size = size
        self.replicas = replicas
        changedContexts = changedSince.flatMap { olderSnapshots.contains($0) ? $0 : nil }.map {
            [MetaContextOffer(name: ChangedBlocksContext.name(since: $0), id: 2)]
        } ?? []
        timeout = UInt64(timeoutSeconds * 1e9)
        self.logger = logger
    }

    public func makeWorker(ring: Ring, arena: BufferArena) throws -> SnapshotReaderWorker {
        SnapshotReaderWorker(reader: self, ring: ring)
    }

    public func flush() throws {}

    /// A connection to replica `i`'s snapshot session with the contexts served selected,
    /// or nil when the replica cannot serve it (down, or without the snapshot).
    func connect(_ i: Int) -> NBDClient? {
        do {
            let client = try NBDClient()
            try client.setExportName(exportName.description)
            try client.addMetaContext(MetaContext.baseAllocation)
            for context in changedContexts { try client.addMetaContext(context.name) }
            try client.connect(to: replicas[i])
            return client
        } catch {
            logger.warning("replica \(replicas[i]) cannot serve snapshot \(exportName.snapshot): \(error)")
            return nil
        }
    }

    func contextName(_ id: UInt32) -> String? { changedContexts.first { $0.id == id }?.name }
}

extension SnapshotReader {
    /// What the first replica that serves the snapshot says of it: the
    /// volume's size and the snapshots older than it (its changed-blocks
    /// contexts), asked in the handshake's option phase without opening it.
    public static func describe(_ exportName: SnapshotExportName, replicas: [SocketAddress])
        throws -> (size: UInt64, olderSnapshots: [String]) {
        var errors: [String] = [], missing: [String] = []
        for address in replicas {
            do {
                let client = try NBDClient()
                defer { try? client.abortOptions() }
                try client.setOptionMode(true)
                try client.connect(to: address)
                try client.setExportName(exportName.description)
                try client.info()
                let size = try client.size
                try client.addMetaContext(ChangedBlocksContext.prefix)
                let contexts = try client.listMetaContexts()
                let older = contexts.filter { $0.hasPrefix(ChangedBlocksContext.prefix) }
                    .map { String($0.dropFirst(ChangedBlocksContext.prefix.count)) }
                return (size, older)
            } catch let error as NBDClientError where error.errno == ENOENT {
                missing.append("\(address)")
            } catch {
                errors.append("\(address): \(error)")
            }
        }
        if errors.isEmpty {
            throw SnapshotExportError(description: "volume \(exportName.volume) has no snapshot '\(exportName.snapshot)'"
                                      + " (asked \(missing.joined(separator: ", ")))")
        }
        throw SnapshotExportError(description: "no replica serves snapshot '\(exportName.snapshot)' of \(exportName.volume): "
                                  + (errors + missing.map { "\($0): no such snapshot" }).joined(separator: "; "))
    }
}

public struct SnapshotExportError: Error, CustomStringConvertible {
    public let description: String
}
