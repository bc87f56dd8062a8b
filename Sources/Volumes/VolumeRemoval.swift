import Foundation
import NodeRegistry

extension Node {
    /// Removes a detached volume: its replicas here and those it placed on
    /// other nodes go with their data; replicas given by address keep theirs.
    /// With `force`, a replica whose node does not answer is forgotten (its
    /// data stays there). Returns how many replicas elsewhere keep their data.
    @discardableResult
    public func removeVolume(_ name: String, force: Bool = false, credentials: ControlCredentials) throws -> Int {
        let held = try lock(name)
        defer { held.unlock() }
        let volume = try self.volume(name)
        let attachment = self.attachment(volume)
        if let device = attachment.device {
            throw KeelError("volume \(name) is attached as \(device); unmount it and run 'keel volume detach \(name)' first")
        }
        if attachment.engineRunning {
            throw KeelError("volume \(name)'s engine is running; stop it with 'keel volume detach \(name)' first")
        }
        if volume.enginePlacedElsewhere,
           let running = RemoteEngines(volume: volume, node: self, credentials: credentials).states().first(where: { $0.running == true }) {
            throw KeelError("volume \(name)'s engine is running on node \(running.node); stop it with 'keel volume detach \(name)' first")
        }
        let unremoved = RemoteReplicas(volume: volume, node: self, credentials: credentials).remove()
        if !unremoved.isEmpty && !force {
            throw KeelError("cannot remove the replicas of \(name) on other nodes (" + unremoved.joined(separator: "; ")
                + "); the volume stays registered: bring the nodes back and try again, or pass --force to forget those replicas (their data stays there)")
        }
        do { try removeLocalReplicas(volume) } catch {
            throw KeelError("cannot remove the replicas of \(name): \(error); the volume stays registered, try again")
        }
        // A frontend that outlived its device (it waits for an engine) goes too.
        let runner = self.runner(volume.runner)
        try? runner.stop(frontendDaemon(volume))
        runner.forget(frontendDaemon(volume))
        for unit in [VolumeRecord.EngineUnit.first, .alternate] {
            var engine = volume
            engine.engineUnit = unit
            runner.forget(engineDaemon(engine))
        }
        do { try registry.remove(named: name) } catch { throw KeelError("\(error)") }
        return volume.replicas.filter { !$0.isLocal && $0.node == nil }.count
    }
}
