/// A volume this node knows: what it takes to start its replicas and its engine.
public struct VolumeRecord: Equatable, Sendable {
    public var name: String
    /// Minted at creation (a UUID): replicas record it at their first claim and
    /// refuse engines of any other volume, also one that reuses the name.
    public var id: String
    public var size: UInt64
    public var replicas: [ReplicaRecord]
    /// Connections of the kernel device (fixed for the device's life).
    public var connections: Int
    /// Who runs the volume's daemons on this node.
    public var runner: Runner
    /// Seconds since the epoch.
    public var createdAt: Int64
    /// Where the engine may run, in order (`keel node add` names); empty: on this node.
    public var engineNodes: [String]
    /// The TCP port the engine listens on when it runs on another node.
    public var enginePort: Int
    /// Which of its two units the engine runs as under systemd: a live migration starts
    /// engine B as the other, which then is the volume's engine.
    public var engineUnit: EngineUnit

    public enum EngineUnit: String, Sendable {
        /// `keel-engine@VOLUME`
        case first = ""
        /// `keel-engine-alt@VOLUME`
        case alternate = "alt"

        public var other: EngineUnit { self == .first ? .alternate : .first }
    }

    /// The replicas an engine starts with: a move's joining ones are not members yet
    /// (the move adds them through the engine, which rebuilds them).
    public var engineReplicas: [ReplicaRecord] { replicas.filter { $0.role != .joining } }

    /// The engine runs on other nodes, failed over by the device frontend.
    public var enginePlacedElsewhere: Bool { !engineNodes.isEmpty }

    public enum Runner: String, Sendable {
        /// systemd units (`keel-replica@`, `keel-engine@`), when PID 1 is systemd.
        case systemd
        /// Processes `keel` started itself, tracked by pid files.
        case keel
    }

    public init(name: String, id: String = "", size: UInt64, replicas: [ReplicaRecord], connections: Int,
                runner: Runner, createdAt: Int64, engineNodes: [String] = [], enginePort: Int = 0, engineUnit: EngineUnit = .first) {
        self.name = name
        self.id = id
        self.size = size
        self.replicas = replicas
        self.connections = connections
        self.runner = runner
        self.createdAt = createdAt
        self.engineNodes = engineNodes
        self.enginePort = enginePort
        self.engineUnit = engineUnit
    }

    /// Volume names become file names, unit instances and `/dev/keel/<name>`.
    public static func validate(name: String) -> String? {
        guard !name.isEmpty, name.count <= 64,
              name.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "._-".contains($0)) }),
              !name.hasPrefix("."), !name.hasPrefix("-") else {
            return "a volume name takes 1 to 64 letters, digits, '.', '_' or '-', and does not start with '.' or '-'"
        }
        return nil
    }
}

/// One of a volume's replicas: its data address, and for one this node runs,
/// its data directory; for one a node agent started, that node's name.
public struct ReplicaRecord: Equatable, Sendable {
    public var address: String
    public var directory: String?
    public var node: String?
    /// Its name on this node or on its agent's (`VOLUME-rSLOT`), kept for its life: the
    /// replica list's order changes when a move adds and removes replicas.
    public var slot: Int
    public var role: Role

    /// Where a replica stands in a move of the volume's replicas (`keel volume move`).
    public enum Role: String, Sendable {
        case member
        /// Added by a move that has not finished: removed again if the move is cancelled or fails.
        case joining
        /// A joining replica the engine has made RW: a member of the volume now (an engine
        /// started again must be given it), still removed if the move is cancelled or fails.
        case joined
        /// To be removed when the move finishes: kept if it is cancelled or fails.
        case leaving
    }

    public var isLocal: Bool { directory != nil }

    /// Added by a move that has not finished (joining or joined): removed again if it is undone.
    public var isNew: Bool { role == .joining || role == .joined }

    public init(address: String, directory: String? = nil, node: String? = nil, slot: Int = 0, role: Role = .member) {
        self.address = address
        self.directory = directory
        self.node = node
        self.slot = slot
        self.role = role
    }
}

/// Another node, by the name `keel node add` gave it, and its agent's address.
public struct NodeRecord: Equatable, Sendable {
    public var name: String
    public var address: String
    /// Seconds since the epoch.
    public var addedAt: Int64

    public init(name: String, address: String, addedAt: Int64) {
        self.name = name
        self.address = address
        self.addedAt = addedAt
    }
}

/// A snapshot as the registry keeps it.
public struct SnapshotEntry: Equatable, Sendable {
    public var name: String
    /// Seconds since 1970, UTC.
    public var created: Int64
    public var ownBytes: UInt64

    public init(name: String, created: Int64, ownBytes: UInt64) {
        self.name = name
        self.created = created
        self.ownBytes = ownBytes
    }
}
