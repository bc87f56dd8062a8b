#if canImport(Glibc)
import Glibc
#endif

/// Test-only fault points of a replica, off unless `KEEL_REPLICA_FAULTS` names them.
///
/// - `skip-fdatasync`: FLUSH is answered without flushing, FUA writes lose
///   their FUA and a dirty-region clear does not flush first: the negative
///   control of the power-cut test, which must then find lost writes.
struct ReplicaFaults: Sendable {
    var skipDataSync = false

    static let fromEnvironment: ReplicaFaults = {
        guard let raw = getenv("KEEL_REPLICA_FAULTS") else { return ReplicaFaults() }
        var faults = ReplicaFaults()
        for item in String(cString: raw).split(separator: ",") {
            guard item == "skip-fdatasync" else {
                // A mistyped fault point would let a test pass without its fault.
                fputs("keel: KEEL_REPLICA_FAULTS: unknown fault point '\(item)'\n", stderr)
                exit(2)
            }
            faults.skipDataSync = true
        }
        return faults
    }()
}
