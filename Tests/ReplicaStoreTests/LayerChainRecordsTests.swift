import Foundation
import LayerStack
import ReplicaStore
import SQLite
import Testing

@Suite struct LayerChainRecordsTests {
    private func emptyDirectory() throws -> String {
        let path = "/var/tmp/keel-chain-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }

    @Test func aNewReplicaIsAChainOfOneEmptyHead() throws {
        let dir = try emptyDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let chain = try ReplicaStore.open(directory: dir, size: 4 << 20).chain()
        #expect(chain.count == 1)
        #expect(chain[0].files == LayerFiles(dataPath: dir + "/layers/head.img", mapPath: dir + "/layers/head.map"))
        #expect(try chain[0].files.loadMap().isEmpty)
    }

    /// A replica written before layers had map logs (schema 3) opens as a
    /// chain of one layer: its head is the bottom layer, with an empty map
    /// (its file holds the volume).
    @Test func aReplicaOfSchemaThreeOpensAsAChainOfOne() throws {
        let dir = try emptyDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        _ = try ReplicaStore.open(directory: dir, size: 64 << 20)
        let database = try Database(path: dir + "/" + ReplicaStore.metadataName, create: false)
        try database.execute("ALTER TABLE layers DROP COLUMN map; UPDATE replica SET schema = 3 WHERE id = 1")
        try FileManager.default.removeItem(atPath: dir + "/layers/head.map")

        let chain = try ReplicaStore.open(directory: dir, size: nil).chain()
        #expect(chain.count == 1)
        #expect(chain[0].files == LayerFiles(dataPath: dir + "/layers/head.img", mapPath: dir + "/layers/head.map"))
        #expect(try chain[0].files.loadMap().isEmpty)
        #expect(try database.query("SELECT schema FROM replica").first?[0].integer == ReplicaStore.schemaVersion)
    }
}
