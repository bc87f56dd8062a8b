import Testing
import NodeRegistry
import SQLite
#if canImport(Glibc)
import Glibc
#endif

@Suite struct RegistryTests {
    let directory: String = {
        var template = Array("/tmp/keel-registry.XXXXXX".utf8CString)
        return String(cString: mkdtemp(&template))
    }()

    func volume(_ name: String, replicas: [ReplicaRecord] = [ReplicaRecord(address: "unix:/r0.sock", directory: "/d/r0", slot: 0),
                                                            ReplicaRecord(address: "10.0.0.2:7001", slot: 1)]) -> VolumeRecord {
        VolumeRecord(name: name, size: 1 << 30, replicas: replicas, connections: 2, runner: .keel, createdAt: 1_700_000_000)
    }

    @Test func volumesSurviveReopeningInNameOrder() throws {
        let layout = NodeLayout(stateDirectory: directory + "/state/")
        do {
            let registry = try Registry(layout: layout)
            try registry.add(volume("b"))
            try registry.add(volume("a", replicas: [ReplicaRecord(address: "h:1")]))
        }
        let registry = try Registry(layout: layout)
        #expect(try registry.volumes().map(\.name) == ["a", "b"])
        #expect(try registry.volume(named: "b") == volume("b"))
        #expect(try registry.volume(named: "b")?.replicas.map(\.isLocal) == [true, false])
        #expect(try registry.volume(named: "c") == nil)
    }

    @Test func snapshotsAreReplacedAsAWholeAndGoWithTheVolume() throws {
        let registry = try Registry(layout: NodeLayout(stateDirectory: directory))
        try registry.add(volume("v"))
        #expect(try registry.snapshots(of: "v").seenAt == nil)
        let two = [SnapshotEntry(name: "s1", created: 1, ownBytes: 4096), SnapshotEntry(name: "s2", created: 2, ownBytes: 0)]
        try registry.setSnapshots(two, of: "v", seenAt: 10)
        #expect(try registry.snapshots(of: "v").snapshots == two)
        try registry.setSnapshots([two[1]], of: "v", seenAt: 11)
        #expect(try Registry(layout: NodeLayout(stateDirectory: directory)).snapshots(of: "v") == ([two[1]], 11))
        try registry.remove(named: "v")
        try registry.add(volume("v"))
        #expect(try registry.snapshots(of: "v").snapshots.isEmpty)
    }

    @Test func aNameIsTakenOnce() throws {
        let registry = try Registry(layout: NodeLayout(stateDirectory: directory))
        try registry.add(volume("v"))
        #expect(throws: Registry.Failure.exists("v")) { try registry.add(self.volume("v")) }
    }

    @Test func aNodeInUseByAnEngineIsNotRemoved() throws {
        let registry = try Registry(layout: NodeLayout(stateDirectory: directory))
        let b = NodeRecord(name: "b", address: "10.0.0.2:7800", addedAt: 1)
        try registry.add(b)
        #expect(throws: Registry.Failure.nodeExists("b")) { try registry.add(b) }
        var placed = volume("v", replicas: [ReplicaRecord(address: "10.0.0.3:7001")])
        placed.engineNodes = ["b"]
        placed.enginePort = 10810
        try registry.add(placed)
        #expect(try registry.volume(named: "v") == placed)
        #expect(throws: Registry.Failure.nodeInUse(node: "b", volumes: ["v"])) { try registry.removeNode(named: "b") }
        try registry.remove(named: "v")
        #expect(try registry.removeNode(named: "b"))
        #expect(try registry.nodes().isEmpty)
    }

    /// A live migration under systemd switches the volume's engine unit; a new volume starts on the first.
    @Test func theEngineUnitIsKeptPerVolume() throws {
        let registry = try Registry(layout: NodeLayout(stateDirectory: directory))
        try registry.add(volume("v"))
        #expect(try registry.volume(named: "v")?.engineUnit == .first)
        try registry.setEngineUnit(.alternate, of: "v")
        let reopened = try Registry(layout: NodeLayout(stateDirectory: directory))
        #expect(try reopened.volume(named: "v")?.engineUnit == .alternate)
        #expect(VolumeRecord.EngineUnit.alternate.other == .first)
    }

    /// A migration between engine nodes puts its new node first; the rest keep their order.
    @Test func engineNodesAreReorderedAsAWhole() throws {
        let registry = try Registry(layout: NodeLayout(stateDirectory: directory))
        for (name, host) in [("b", "10.0.0.2"), ("c", "10.0.0.3"), ("d", "10.0.0.4")] {
            try registry.add(NodeRecord(name: name, address: "\(host):7800", addedAt: 1))
        }
        var placed = volume("v", replicas: [ReplicaRecord(address: "10.0.0.9:7001")])
        placed.engineNodes = ["b", "c"]
        placed.enginePort = 10810
        try registry.add(placed)
        try registry.setEngineNodes(["d", "b", "c"], of: "v")
        #expect(try registry.volume(named: "v")?.engineNodes == ["d", "b", "c"])
        #expect(throws: Registry.Failure.nodeInUse(node: "d", volumes: ["v"])) { try registry.removeNode(named: "d") }
        try registry.setEngineNodes(["c", "b"], of: "v")
        #expect(try registry.volume(named: "v")?.engineNodes == ["c", "b"])
        #expect(try registry.removeNode(named: "d"))
    }

    /// A registry written before nodes existed keeps its volumes, each with its engine on this node.
    @Test func aVersion3RegistryOpensWithItsVolumesOnThisNode() throws {
        let layout = NodeLayout(stateDirectory: directory)
        try Registry(layout: layout).add(volume("old"))
        let database = try Database(path: layout.registryPath, create: false)
        try database.execute("""
            DROP TABLE engine_nodes; DROP TABLE nodes; DROP TABLE migrations;
            ALTER TABLE volumes DROP COLUMN engine_port; ALTER TABLE replicas DROP COLUMN node;
            ALTER TABLE replicas DROP COLUMN slot; ALTER TABLE replicas DROP COLUMN role;
            ALTER TABLE volumes DROP COLUMN engine_unit;
            PRAGMA user_version = 3;
            """)
        let registry = try Registry(layout: layout)
        #expect(try registry.volume(named: "old") == volume("old"))
        #expect(try registry.volume(named: "old")?.enginePlacedElsewhere == false)
        try registry.add(NodeRecord(name: "b", address: "h:1", addedAt: 1))
        #expect(try registry.nodes().map(\.name) == ["b"])
    }

    /// A registry written before moves existed names each replica by its position: that becomes its slot.
    @Test func aVersion4RegistryKeepsItsReplicasNamesAsSlots() throws {
        let layout = NodeLayout(stateDirectory: directory)
        try Registry(layout: layout).add(volume("old"))
        let database = try Database(path: layout.registryPath, create: false)
        try database.execute("""
            DROP TABLE migrations; ALTER TABLE replicas DROP COLUMN slot; ALTER TABLE replicas DROP COLUMN role;
            ALTER TABLE volumes DROP COLUMN engine_unit;
            PRAGMA user_version = 4;
            """)
        let registry = try Registry(layout: layout)
        #expect(try registry.volume(named: "old")?.replicas.map(\.slot) == [0, 1])
        #expect(try registry.volume(named: "old")?.replicas.map(\.role) == [.member, .member])
        #expect(try registry.migration(of: "old") == nil)
    }

    /// A registry written before engine units alternated runs each engine under its first unit.
    @Test func aVersion5RegistryRunsItsEnginesUnderTheirFirstUnit() throws {
        let layout = NodeLayout(stateDirectory: directory)
        try Registry(layout: layout).add(volume("old"))
        let database = try Database(path: layout.registryPath, create: false)
        try database.execute("ALTER TABLE volumes DROP COLUMN engine_unit; PRAGMA user_version = 5;")
        let registry = try Registry(layout: layout)
        #expect(try registry.volume(named: "old") == volume("old"))
        #expect(try registry.volume(named: "old")?.engineUnit == .first)
        #expect(try database.query("PRAGMA user_version").first?.first?.integer == Registry.schemaVersion)
    }

    @Test func aMoveRewritesTheReplicasAndItsRecordKeepsACancelAsked() throws {
        let registry = try Registry(layout: NodeLayout(stateDirectory: directory))
        try registry.add(volume("v"))
        let moved = [ReplicaRecord(address: "10.0.0.2:7001", slot: 1, role: .leaving),
                     ReplicaRecord(address: "10.0.0.3:7001", node: "c", slot: 2, role: .joining)]
        try registry.setReplicas(moved, of: "v")
        #expect(try registry.volume(named: "v")?.replicas == moved)
        #expect(try registry.volume(named: "v")?.engineReplicas.map(\.slot) == [1])

        var record = MigrationRecord(volume: "v", kind: "replicas", status: .migratingAttachable, phase: "adding",
                                     target: "node c", bytesTotal: 100, startedAt: 10, updatedAt: 10, pid: 42)
        try registry.setMigration(record)
        #expect(try registry.requestCancel(of: "v"))
        record.bytesDone = 50
        try registry.setMigration(record)
        #expect(try registry.migration(of: "v")?.cancelRequested == true, "a progress update keeps the cancel")
        #expect(try registry.migration(of: "v")?.percent == 50)
        record.status = .error
        try registry.setMigration(record)
        #expect(try !registry.requestCancel(of: "v"), "nothing runs to cancel")
        record.status = .migratingAttachable
        record.startedAt = 20
        try registry.setMigration(record)
        #expect(try registry.migration(of: "v")?.cancelRequested == false, "a new move starts without the old cancel")
        try registry.remove(named: "v")
        #expect(try registry.migration(of: "v") == nil)
    }

    @Test func removingForgetsTheReplicasToo() throws {
        let registry = try Registry(layout: NodeLayout(stateDirectory: directory))
        try registry.add(volume("v"))
        #expect(try registry.remove(named: "v"))
        #expect(try !registry.remove(named: "v"))
        try registry.add(volume("v", replicas: [ReplicaRecord(address: "h:2")]))
        #expect(try registry.volume(named: "v")?.replicas == [ReplicaRecord(address: "h:2")])
    }

    @Test func anUnwritableStateDirectoryNamesTheWayOut() throws {
        let layout = NodeLayout(stateDirectory: "/proc/keel-cannot-exist/state")
        #expect {
            _ = try Registry(layout: layout)
        } throws: { error in
            "\(error)".contains("cannot create /proc/keel-cannot-exist") && "\(error)".contains("--state-dir")
        }
    }

    @Test func volumeNamesAreSafeAsFileAndUnitNames() {
        for good in ["vol1", "db.data", "a_b-c", String(repeating: "x", count: 64)] {
            #expect(VolumeRecord.validate(name: good) == nil, "\(good)")
        }
        for bad in ["", "a/b", "-x", ".hidden", "a b", "é", String(repeating: "x", count: 65)] {
            #expect(VolumeRecord.validate(name: bad) != nil, "\(bad)")
        }
    }
}
