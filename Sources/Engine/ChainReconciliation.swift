/// What a start does about replicas whose snapshot lists differ: an engine
/// killed while it took a snapshot leaves some replicas with it and some
/// without. Writes were held then, and go on only once every replica has
/// answered (a replica that failed the snapshot is failed, and leaves the
/// membership), so the members that lack the newest snapshots hold, in their
/// heads, exactly what the others froze: freezing the missing names now,
/// before anything is written or resynced, gives every member the same chain.
///
/// An engine killed while it removed a snapshot leaves some replicas with it
/// and some without; those without keep its name as removed. The removal is
/// finished, never undone: every member that still holds a snapshot some
/// member removed merges it away (which changes no read), before any freeze.
public enum ChainReconciliation {
    public struct Plan: Equatable {
        /// Per replica, the snapshots it must remove (merge away), in order.
        public var remove: [Int: [String]] = [:]
        /// Per replica, the snapshot names it must freeze, in order.
        public var freeze: [Int: [String]] = [:]
        /// Replicas whose list is not a prefix of the longest one: no freeze can mend them.
        public var diverged: [Int] = []

        public init() {}
    }

    /// `lists`: each member's snapshot names, oldest first; `removed`: the
    /// names each member removed.
    public static func plan(_ lists: [Int: [String]], removed: [Int: [String]] = [:]) -> Plan {
        var plan = Plan()
        let removedAnywhere = Set(removed.values.joined())
        var lists = lists
        for (replica, names) in lists {
            let stale = names.filter(removedAnywhere.contains)
            guard !stale.isEmpty else { continue }
            plan.remove[replica] = stale
            lists[replica] = names.filter { !removedAnywhere.contains($0) }
        }
        let ordered = lists.sorted { $0.key < $1.key }
        // The longest list, the lowest replica's among equals: the plan is the same whatever the order given.
        guard let longest = ordered.reduce(nil as [String]?, { best, entry in
            entry.value.count > (best?.count ?? -1) ? entry.value : best
        }) else { return plan }
        for (replica, names) in ordered {
            if Array(longest.prefix(names.count)) != names {
                plan.diverged.append(replica)
            } else if names.count < longest.count {
                plan.freeze[replica] = Array(longest.dropFirst(names.count))
            }
        }
        return plan
    }
}
