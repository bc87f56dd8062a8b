import IOUring
import LibNBD
import Logging
import NBDProtocol
import NBDServer
import Syscalls

/// The volume as the engine's frontend sees it: every write goes to every
/// healthy replica and is acknowledged when all of them acknowledged it;
/// reads go to one healthy replica at a time.
public final class EngineDevice: BlockDevice {
    public let volume: String
    public let size: UInt64
    public let epoch: UInt64
    public let replicas: ReplicaSet
    /// How long a replica may leave a command unanswered before it is failed (ns).
    public let replicaTimeout: UInt64
    public let counters = IOCounters()
    let logger: Logger

    public var readOnly: Bool { false }
    /// Replicas take any offset and length; buffers need no alignment here.
    public var alignment: Int { 1 }

    public init(volume: String, size: UInt64, epoch: UInt64, replicas: ReplicaSet,
                replicaTimeoutSeconds: Double = 8, logger: Logger) {
        self.volume = volume
        self.size = size
        self.epoch = epoch
        self.replicas = replicas
        replicaTimeout = UInt64(replicaTimeoutSeconds * 1e9)
        self.logger = logger
    }

    /// The export name that carries this engine's epoch to a replica.
    public var replicaExportName: String { "\(volume)@\(epoch)" }

    public func makeWorker(ring: Ring, arena: BufferArena) throws -> EngineWorker {
        try EngineWorker(device: self, ring: ring)
    }

    /// Replicas make writes durable on FLUSH and FUA, which the engine forwards.
    public func flush() throws {}

    /// Opens one connection to a replica with this engine's epoch.
    func connect(_ index: Int) throws -> NBDClient {
        let client = try NBDClient()
        try client.setExportName(replicaExportName)
        switch replicas.addresses[index] {
        case .unix(let path): try client.connect(unixSocket: path)
        case .tcp(let host, let port): try client.connect(host: host, port: port)
        }
        return client
    }
}
