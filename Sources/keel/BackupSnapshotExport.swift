import Foundation
import Logging
import NBDProtocol
import NBDServer
import ReplicaIdentity
import SnapshotExport
import Syscalls
import Volumes

/// A snapshot served read-only on a private unix socket of this process for as long as a
/// backup reads it: the same reader and server as `keel snapshot export`, so its replicas
/// count it as a reader (a removal of the snapshot is refused meanwhile).
struct PrivateSnapshotExport {
    let uri: String
    let olderSnapshots: [String]

    /// `changedSince`: the older snapshot whose `keel:changed:` view the export serves, if it still exists.
    static func serve<T>(volume: String, snapshot: String, changedSince: String?, replicas: [SocketAddress], logger: Logger,
                         _ body: (PrivateSnapshotExport) throws -> T) throws -> T {
        let (reader, olderSnapshots) = try SnapshotReader.opening(volume: volume, snapshot: snapshot, replicas: replicas,
                                                                  logger: logger) { _ in changedSince }
        let directory = FileManager.default.temporaryDirectory.path + "/keel-backup-\(getpid())-\(UInt32.random(in: 0 ... .max))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: false,
                                                attributes: [.posixPermissions: 0o700])
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let socket = directory + "/snapshot.sock"
        let listener = try bindListener(.unix(path: socket))
        let export = ExportDescription(name: snapshot, description: "Keel snapshot \(snapshot) of \(volume), for a backup",
                                       size: reader.size, readOnly: true, metaContexts: reader.changedContexts)
        let server = Server(device: reader, listener: listener, catalog: StaticExports([export]), threads: 1, logger: logger)
        do { try server.start() } catch {
            listener.close()
            throw KeelError("cannot start reading snapshot \(snapshot): \(error)")
        }
        defer {
            server.stop()
            server.wait()
            listener.close()
        }
        return try body(PrivateSnapshotExport(uri: "nbd+unix:///\(snapshot)?socket=\(socket)", olderSnapshots: olderSnapshots))
    }
}

extension SnapshotReader {
    /// A reader of the snapshot serving the changed-blocks view since the older snapshot `changedSince` picks
    /// (from the older ones, oldest first), and the snapshots older than it; or a one-line refusal (an unknown snapshot, say).
    static func opening(volume: String, snapshot: String, replicas: [SocketAddress], logger: Logger,
                        changedSince: (_ olderSnapshots: [String]) throws -> String?) throws
        -> (SnapshotReader, olderSnapshots: [String]) {
        let exportName = SnapshotExportName(volume: volume, snapshot: snapshot)
        let described: (size: UInt64, olderSnapshots: [String])
        do { described = try SnapshotReader.describe(exportName, replicas: replicas) } catch {
            throw KeelError("\(error); see keel snapshot ls \(volume)")
        }
        let reader = SnapshotReader(exportName: exportName, size: described.size, replicas: replicas,
                                    olderSnapshots: described.olderSnapshots, changedSince: try changedSince(described.olderSnapshots),
                                    logger: logger)
        return (reader, described.olderSnapshots)
    }
}
