import ControlAPI
import LibNBD
import ReplicaIdentity
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// An engine's start in two steps, for a migration: `standBy` looks at every
/// replica and opens its sessions to them in standby (they claim nothing and
/// fence nobody; the engine that runs now goes on undisturbed); `activate`
/// then claims the replicas with those sessions' epoch and finishes the start
/// as `VolumeStartup.run` does, without a single new connection.
public final class StandbyStart: @unchecked Sendable {  // lostReplicas only polls sockets fixed at init
    public let startup: VolumeStartup
    public let addresses: [SocketAddress]
    /// The epoch the sessions wait for: one more than any replica had seen at standby.
    public let epoch: UInt64
    private let links: NetworkStartupLinks
    /// By replica index: a session for each I/O thread, handed to the engine once active.
    private var dataLinks: [Int: [NBDClient]]
    /// Every session's socket, by replica: polled to see whether the replica closed them.
    private let sessionSockets: [Int: [Int32]]

    /// `threads`: the engine's I/O threads, each of which keeps a connection to every replica.
    public init(_ startup: VolumeStartup, addresses: [SocketAddress], threads: Int) throws {
        self.startup = startup
        self.addresses = addresses
        links = NetworkStartupLinks(addresses: addresses, startup: startup)
        var reached: [Int] = []
        var newest: UInt64 = 0
        var unreachable: [String] = []
        do {
            for i in addresses.indices {
                do {
                    newest = max(newest, try links.inspect(i).owner.epoch)
                    reached.append(i)
                } catch let error as StartupUnreachable {
                    unreachable.append("\(addresses[i]): \(error.reason)")
                }
            }
            guard !reached.isEmpty else {
                throw EngineError("cannot reach any replica (\(unreachable.joined(separator: "; "))); nothing was changed")
            }
            guard newest < Owner.maximumEpoch else {
                throw EngineError("the replicas have seen the largest epoch there is (\(newest)); nothing was changed")
            }
            epoch = newest + 1
            dataLinks = try links.standBy(reached, epoch: epoch, dataLinks: threads)
            sessionSockets = dataLinks.mapValues { $0.map(\.descriptor) }.merging(links.standbyCopyLinks.mapValues { [$0.descriptor] }) { $0 + $1 }
        } catch {
            links.close()
            throw error
        }
        for line in unreachable { startup.logger.warning("replica unreachable at standby, left out: \(line)") }
    }

    /// Sessions open: one per reachable replica (for people and `Alive`).
    public var replicasReached: Int { dataLinks.count }

    /// Replicas that closed a standby session since (restarted, or cut off): a switch to
    /// this engine would leave them out. Safe from any thread (it only polls sockets).
    public func lostReplicas() -> [SocketAddress] {
        lostIndexes().map { addresses[$0] }
    }

    private func lostIndexes() -> [Int] {
        sessionSockets.filter { _, sockets in
            var polls = sockets.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            _ = poll(&polls, nfds_t(polls.count), 0)
            // Nothing is sent on a standby session: anything to read is its end.
            return polls.contains { $0.revents != 0 }
        }.keys.sorted()
    }

    /// Test-only (`drop-standby-links`): as if every replica link were cut.
    public func dropSessionsForTest() {
        for socket in sessionSockets.values.flatMap({ $0 }) { Glibc.shutdown(socket, Int32(SHUT_RDWR)) }
    }

    /// Claims the replicas and finishes the start; the sessions for the I/O
    /// threads go to `device` (`EngineDevice.adopt`) by the caller.
    public func activate() throws -> (outcome: VolumeStartup.Outcome, links: [(SocketAddress, NBDClient)]) {
        defer { links.close() }
        for i in lostIndexes() {
            startup.logger.warning("replica \(addresses[i]) closed its standby sessions (restarted, or cut off): left out")
            links.leaveOutOfStandby(i)
            for client in dataLinks.removeValue(forKey: i) ?? [] { client.abandon() }
        }
        let outcome: VolumeStartup.Outcome
        do { outcome = try startup.run(links, addresses: addresses, epoch: epoch) } catch let error as EpochNotNewer {
            close()
            throw EngineError("the replicas moved on to epoch \(error.newest) since this engine began standing by for epoch \(epoch) "
                              + "(another engine started meanwhile); nothing was claimed: start a standby engine again")
        } catch {
            close()
            throw error
        }
        let taken = dataLinks.flatMap { i, clients in clients.map { (addresses[i], $0) } }
        dataLinks = [:]
        return (outcome, taken)
    }

    /// Closes every session (standing down, or after a failed activation).
    public func close() {
        for client in dataLinks.values.flatMap({ $0 }) { client.abandon() }
        dataLinks = [:]
        links.close()
    }
}
