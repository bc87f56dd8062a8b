/// What a start does about members whose snapshots differ, before the resync
/// writes anything into their heads. Every member must end with the same
/// chain, reading the same in every snapshot.
///
/// A create stopped half way (the engine killed, or a power cut) leaves some
/// members with the snapshot and some without, or with it unsealed (its
/// layer not known to be on disk: a power cut takes unsynced writes from
/// each replica's copy differently). Such a create was never answered:
/// the engine answers only once every member has sealed it. So it is
/// undone: every member that holds a snapshot not sealed on every member
/// merges it away, which changes no read of the head.
///
/// A removal stopped half way leaves some members with the snapshot and some
/// without; those without keep its name as removed. It is finished, never
/// undone: every member that still holds it merges it away too.
public enum ChainReconciliation {
    /// What one member says of its chain.
    public struct Chain: Equatable {
        /// Its snapshots, oldest first.
        public var names: [String]
        public var unsealed: Set<String> = []
        /// Names it merged away.
        public var removed: [String] = []

        public init(names: [String], unsealed: Set<String> = [], removed: [String] = []) {
            self.names = names
            self.unsealed = unsealed
            self.removed = removed
        }
    }

    public struct Plan: Equatable {
        /// Per replica, the snapshots it must remove (merge away), oldest first.
        public var remove: [Int: [String]] = [:]
        /// Replicas whose remaining snapshots are not in the lowest member's order: nothing mends them.
        public var diverged: [Int] = []

        public init() {}
    }

    public static func plan(_ chains: [Int: Chain]) -> Plan {
        var plan = Plan()
        let removedAnywhere = Set(chains.values.flatMap(\.removed))
        let unsealedAnywhere = Set(chains.values.flatMap(\.unsealed))
        let heldEverywhere = chains.values.map { Set($0.names) }.reduce(nil as Set<String>?) { $0?.intersection($1) ?? $1 } ?? []
        let kept = { (name: String) in
            heldEverywhere.contains(name) && !removedAnywhere.contains(name) && !unsealedAnywhere.contains(name)
        }
        let ordered = chains.sorted { $0.key < $1.key }
        for (replica, chain) in ordered {
            let dropped = chain.names.filter { !kept($0) }
            if !dropped.isEmpty { plan.remove[replica] = dropped }
        }
        guard let reference = ordered.first.map({ $0.value.names.filter(kept) }) else { return plan }
        plan.diverged = ordered.filter { $0.value.names.filter(kept) != reference }.map(\.key)
        return plan
    }
}
