import ControlAPI
import GRPCCore
import LibNBD
import ReplicaIdentity
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// `StartupLinks` over the network: NBD to look at, claim and copy between
/// replicas, each replica's gRPC control API for its records. Every call is
/// bounded by the replica timeout.
final class NetworkStartupLinks: StartupLinks {
    private let addresses: [SocketAddress]
    private let startup: VolumeStartup
    private var controls: [Int: ReplicaControlClient] = [:]
    /// The claims: a connection with the new epoch to each replica, which the resync copies over.
    private var clients: [Int: NBDClient] = [:]
    /// While standing by: the epoch the standby sessions wait for, and the sessions (see `standBy`).
    private var standby: (epoch: UInt64, replicas: Set<Int>, copyLinks: [Int: NBDClient])?

    init(addresses: [SocketAddress], startup: VolumeStartup) {
        self.addresses = addresses
        self.startup = startup
    }

    /// Abandoned, not shut down: a replica may have become unreachable since (its node down).
    func close() {
        for client in clients.values { client.abandon() }
        for client in standby?.copyLinks.values ?? [:].values { client.abandon() }
        clients = [:]
        standby = nil
    }

    /// Opens a standby session of `epoch` (`ReplicaExportName.standby`) to
    /// every replica inspected before: one for the start's copies, which it
    /// keeps, and `dataLinks` more, returned by replica for the I/O threads.
    /// Claims nothing; from now on `inspect` asks only the control API (the
    /// replica was checked), and `claim` is the control API's `Claim`.
    func standBy(_ replicas: [Int], epoch: UInt64, dataLinks: Int) throws -> [Int: [NBDClient]] {
        var copyLinks: [Int: NBDClient] = [:]
        var data: [Int: [NBDClient]] = [:]
        do {
            for i in replicas {
                copyLinks[i] = try openStandby(i, epoch: epoch)
                data[i] = try (0..<dataLinks).map { _ in try openStandby(i, epoch: epoch) }
            }
        } catch {
            for client in Array(copyLinks.values) + data.values.flatMap({ $0 }) { client.abandon() }
            throw error
        }
        standby = (epoch, Set(replicas), copyLinks)
        return data
    }

    /// A replica whose standby sessions were lost is left out of the activation, as one
    /// that was unreachable at standby (`inspect` says so).
    func leaveOutOfStandby(_ replica: Int) {
        standby?.replicas.remove(replica)
        if let link = standby?.copyLinks.removeValue(forKey: replica) { link.abandon() }
    }

    /// The standby session kept for the start's copies, by replica.
    var standbyCopyLinks: [Int: NBDClient] { standby?.copyLinks ?? [:] }

    private func openStandby(_ replica: Int, epoch: UInt64) throws -> NBDClient {
        let name = ReplicaExportName(volume: startup.identity, owner: Owner(epoch: epoch, engine: startup.engineID), standby: true)
        do {
            return try RegionCopier.connect {
                try $0.setExportName(name.description)
                try $0.connect(to: addresses[replica])
            }
        } catch {
            throw EngineError("replica \(addresses[replica]) refused a standby session of epoch \(epoch): \(error)")
        }
    }

    func inspect(_ replica: Int) throws -> Keel_Control_V1_ReplicaStatus {
        let address = addresses[replica]
        if let standby {
            guard standby.replicas.contains(replica) else { throw StartupUnreachable(reason: "no standby session: it did not answer when the engine began standing by, or closed the session since") }
            do { return try controlCall(replica) { try await $0.status(.init(), options: $1) } } catch {
                throw StartupUnreachable(reason: "\(error)")
            }
        }
        let probe = try NBDClient()
        do {
            try probe.setOptionMode(true)
            try probe.connect(to: address)
        } catch {
            throw StartupUnreachable(reason: "\(error)")
        }
        let exports: [String]
        do { exports = try probe.listExports() } catch {
            // ERR_TLS_REQD reaches libnbd's caller as ENOTSUP, as an unsupported option would.
            let hint = LinkTLS.current.credentials == nil ? " (a replica that requires TLS answers so: pass --replica-tls require with credentials)" : ""
            throw EngineError("cannot list the exports of replica \(address): \(error)\(hint)")
        }
        let epoch = try VolumeStartup.checkListing(exports, of: address, for: startup.identity).owner.epoch
        let replicaSize: UInt64
        do {
            // Asks about the export without opening it: claims nothing, but a
            // replica of another volume refuses here, before anything is claimed.
            try probe.setExportName(exportName(Owner(epoch: epoch, engine: "")))
            try probe.info()
            replicaSize = try probe.size
            try? probe.abortOptions()
        } catch {
            throw EngineError("cannot inspect replica \(address): \(error)")
        }
        guard replicaSize == startup.size else {
            throw EngineError("replica \(address) holds \(replicaSize) bytes but the volume is \(startup.size); nothing was changed")
        }
        let controlAddress = defaultControlAddress(forData: address)
        let control = try ReplicaControlClient(address: controlAddress)
        controls[replica] = control
        do {
            return try control.call(timeout: startup.replicaTimeoutSeconds) { try await $0.status(.init(), options: $1) }
        } catch {
            throw EngineError("replica \(address) answers NBD but not its control API at \(controlAddress): \(error)")
        }
    }

    func claim(_ replica: Int, for owner: Owner) throws {
        if standby != nil { return try claim([replica], for: owner) }
        do {
            clients[replica] = try RegionCopier.connect {
                try $0.setExportName(exportName(owner))
                try $0.connect(to: addresses[replica])
            }
        } catch {
            throw EngineError("replica \(addresses[replica]) refused epoch \(owner.epoch): \(error)")
        }
    }

    /// A standby engine's claims go through the control API, all at once: the
    /// time they take is the time the host's I/O is held in a migration.
    func claim(_ replicas: [Int], for owner: Owner) throws {
        guard let standby else {
            for i in replicas { try claim(i, for: owner) }
            return
        }
        precondition(owner.epoch == standby.epoch, "a standby engine claims with its sessions' epoch")
        let request = Keel_Control_V1_ClaimRequest.with {
            $0.owner = owner.message
            $0.volume = startup.volume
            $0.volumeID = startup.volumeID
        }
        let dying = FaultPoints.fromEnvironment.dieMidActivation
        let calls = (dying ? Array(replicas.prefix(1)) : replicas).map { i in
            (i, controls[i]!.start(timeout: startup.replicaTimeoutSeconds) { try await $0.claim(request, options: $1) })
        }
        if dying {
            _ = calls.map { try? $0.1.take().get() }
            kill(getpid(), SIGKILL)
        }
        var refusals: [String] = []
        for (i, call) in calls {
            do { _ = try call.take().get() } catch {
                refusals.append("replica \(addresses[i]) refused epoch \(owner.epoch): \(error)")
                continue
            }
            clients[i] = standby.copyLinks[i]
            self.standby?.copyLinks[i] = nil
        }
        if !refusals.isEmpty { throw EngineError(refusals.joined(separator: "; ")) }
    }

    func setMembership(_ membership: Keel_Control_V1_Membership, on replicas: [Int], for owner: Owner) throws {
        let update = Keel_Control_V1_MembershipUpdate.with { $0.owner = owner.message; $0.membership = membership }
        let calls = replicas.map { i in
            (i, controls[i]!.start(timeout: startup.replicaTimeoutSeconds) { try await $0.setMembership(update, options: $1) })
        }
        for (i, call) in calls {
            do { _ = try call.take().get() } catch {
                throw EngineError("replica \(addresses[i]) failed a control call: \(error)")
            }
        }
    }

    func status(_ replica: Int) throws -> Keel_Control_V1_ReplicaStatus {
        try controlCall(replica) { try await $0.status(.init(), options: $1) }
    }

    func copy(_ range: ByteRange, from source: Int, to targets: [Int]) throws {
        let copier = RegionCopier(source: clients[source]!, targets: targets.map { clients[$0]! },
                                  timeoutSeconds: startup.replicaTimeoutSeconds)
        try copier.copy(offset: range.offset, length: range.length)
    }

    func flush(_ replica: Int) throws {
        try clients[replica]!.flush()
    }

    func clearDirty(_ ranges: [Keel_Control_V1_ByteRange], on replica: Int, for owner: Owner) throws {
        let request = Keel_Control_V1_DirtyRanges.with { $0.owner = owner.message; $0.ranges = ranges }
        _ = try controlCall(replica) { try await $0.clearDirty(request, options: $1) }
    }

    func setMembership(_ membership: Keel_Control_V1_Membership, on replica: Int, for owner: Owner) throws {
        let update = Keel_Control_V1_MembershipUpdate.with { $0.owner = owner.message; $0.membership = membership }
        _ = try controlCall(replica) { try await $0.setMembership(update, options: $1) }
    }

    func mergeSnapshot(_ replica: Int, name: String, for owner: Owner) throws {
        let request = Keel_Control_V1_MergeSnapshotRequest.with { $0.owner = owner.message; $0.name = name }
        // A merge copies the layer's data: far longer than one control call may take.
        let timeout = max(startup.replicaTimeoutSeconds * 4, Double(startup.size) / 20e6)
        do { _ = try controls[replica]!.call(timeout: timeout) { try await $0.mergeSnapshot(request, options: $1) } } catch {
            throw EngineError("replica \(addresses[replica]) failed to remove snapshot \(name): \(error)")
        }
    }

    private func exportName(_ owner: Owner) -> String {
        ReplicaExportName(volume: startup.identity, owner: owner).description
    }

    private func controlCall<T: Sendable>(_ replica: Int,
                                          _ body: @escaping @Sendable (ReplicaControlClient.Stub, CallOptions) async throws -> T) throws -> T {
        do { return try controls[replica]!.call(timeout: startup.replicaTimeoutSeconds, body) } catch {
            throw EngineError("replica \(addresses[replica]) failed a control call: \(error)")
        }
    }
}
