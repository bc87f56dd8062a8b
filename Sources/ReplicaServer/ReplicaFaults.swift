import Logging
import ReplicaStore
#if canImport(Glibc)
import Glibc
#endif

/// Test-only fault points of a replica, off unless `KEEL_REPLICA_FAULTS` names them.
///
/// - `skip-fdatasync`: FLUSH is answered without flushing, FUA writes lose
///   their FUA and a dirty-region clear does not flush first: the negative
///   control of the power-cut test, which must then find lost writes.
/// - `hold-store-on-mark=PATH`: each dirty mark first holds the store's lock
///   until PATH exists (at most a minute), as a slow SQLite commit would: the
///   data path must go on meanwhile.
struct ReplicaFaults: Sendable {
    var skipDataSync = false
    var holdStoreOnMark: String?

    static let fromEnvironment: ReplicaFaults = {
        guard let raw = getenv("KEEL_REPLICA_FAULTS") else { return ReplicaFaults() }
        var faults = ReplicaFaults()
        for item in String(cString: raw).split(separator: ",") {
            let parts = item.split(separator: "=", maxSplits: 1).map(String.init)
            switch (parts[0], parts.count == 2 ? parts[1] : nil) {
            case ("skip-fdatasync", nil): faults.skipDataSync = true
            case ("hold-store-on-mark", let path?): faults.holdStoreOnMark = path
            default:
                // A mistyped fault point would let a test pass without its fault.
                fputs("keel: KEEL_REPLICA_FAULTS: unknown fault point '\(item)'\n", stderr)
                exit(2)
            }
        }
        return faults
    }()
}

extension ReplicaFaults {
    /// The `hold-store-on-mark` fault point: the store's lock held until the test lets go.
    func holdStore(_ store: ReplicaStore, logger: Logger) {
        guard let path = holdStoreOnMark, access(path, F_OK) != 0 else { return }
        store.whileLocked {
            logger.warning("fault point: holding the store's lock until \(path) exists")
            for _ in 0..<600 where access(path, F_OK) != 0 { usleep(100_000) }
        }
    }
}
