import LibNBD
import Syscalls

/// A replica's own read-only session of a snapshot (`VOL@snapshot:NAME` on its data address).
public struct SnapshotSession: Sendable {
    public var address: SocketAddress
    public var exportName: String

    public init(address: SocketAddress, exportName: String) {
        self.address = address
        self.exportName = exportName
    }
}

/// Reads a snapshot (or any NBD export) for a backup: one libnbd connection per reader thread.
/// Bulk reads go straight to the replicas' snapshot sessions when given (spread over them,
/// sparing the export's hop); the export, which moves on from a failed replica, is the fallback.
public final class NBDBackupSource: @unchecked Sendable {
    public let uri: String
    public let size: UInt64
    public var sessions: [SnapshotSession] = []

    public init(uri: String) throws {
        self.uri = uri
        let client = try NBDBackupSource.connect(uri, contexts: [])
        size = try client.size
        try? client.shutdown()
    }

    static func connect(_ uri: String, contexts: [String]) throws -> NBDClient {
        let client = try NBDClient()
        for context in contexts { try client.addMetaContext(context) }
        do { try client.connect(uri: uri) } catch {
            throw BackupStoreError("cannot read \(uri): \(error)")
        }
        return client
    }

    /// A reader: replica session `preferring` (modulo their count) or the next that connects, else the export.
    public func makeReader(preferring first: Int = 0) throws -> (client: NBDClient, direct: Bool) {
        for offset in 0 ..< sessions.count {
            let session = sessions[(first + offset) % sessions.count]
            guard let client = try? NBDClient() else { break }
            do {
                try client.setExportName(session.exportName)
                try client.connect(to: session.address)
                return (client, true)
            } catch {
                continue
            }
        }
        return (try makeExportReader(), false)
    }

    public func makeExportReader() throws -> NBDClient { try Self.connect(uri, contexts: []) }

    /// The blocks holding any 4 KiB block the export's keel:changed:SNAPSHOT context flags as changed,
    /// or nil when the export has no such context (that snapshot is gone).
    public func changedBlocks(since snapshot: String, blockSize: Int) throws -> Set<Int>? {
        let context = "keel:changed:\(snapshot)"
        let client = try Self.connect(uri, contexts: [context])
        defer { try? client.shutdown() }
        guard client.canMetaContext(context) else { return nil }
        return try blocks(of: client, context: context, blockSize: blockSize) { $0 & 1 != 0 }
    }

    /// The blocks that base:allocation reports wholly zero: not read at all.
    public func zeroBlocks(blockSize: Int) throws -> Set<Int> {
        let client = try Self.connect(uri, contexts: ["base:allocation"])
        defer { try? client.shutdown() }
        guard client.canMetaContext("base:allocation") else { return [] }
        let nonZero = try blocks(of: client, context: "base:allocation", blockSize: blockSize) { $0 & 2 == 0 }
        let count = Int((size + UInt64(blockSize) - 1) / UInt64(blockSize))
        return Set(0 ..< count).subtracting(nonZero)
    }

    /// The blocks touched by any extent whose flags pass `selected`.
    private func blocks(of client: NBDClient, context: String, blockSize: Int, selected: (UInt32) -> Bool) throws -> Set<Int> {
        var found = Set<Int>()
        var offset: UInt64 = 0
        let chunk: UInt64 = 1 << 30
        var requests = 0
        while offset < size {
            requests += 1
            precondition(requests < 1 << 24, "block status made no progress at \(offset)")
            let extents = try client.blockStatus(count: min(chunk, size - offset), at: offset, context: context)
            guard !extents.isEmpty else { throw BackupStoreError("\(uri): empty block status at \(offset)") }
            for extent in extents {
                let length = min(UInt64(extent.length), size - offset)
                if selected(extent.flags), length > 0 {
                    let first = Int(offset / UInt64(blockSize)), last = Int((offset + length - 1) / UInt64(blockSize))
                    for index in first ... last { found.insert(index) }
                }
                offset += length
                if offset >= size { break }
            }
        }
        return found
    }
}
