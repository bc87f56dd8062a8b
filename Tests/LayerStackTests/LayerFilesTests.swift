import Glibc
import LayerStack
import Testing

@Suite struct LayerFilesTests {
    private func temporaryDirectory() -> String {
        var template = Array("/tmp/keel-layers-XXXXXX".utf8CString)
        return template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)!) }
    }

    /// The directory and the files in it.
    private func removeDirectory(_ path: String) {
        guard let dir = opendir(path) else { return }
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { unlink(path + "/" + name) }
        }
        closedir(dir)
        rmdir(path)
    }

    @Test func aLayerIsCreatedEmptyAndItsLogReplays() throws {
        let directory = temporaryDirectory()
        defer { removeDirectory(directory) }
        let layer = try LayerFiles.create(in: directory, id: 7, size: 1 << 20)
        var st = stat()
        #expect(stat(layer.dataPath, &st) == 0 && st.st_size == 1 << 20 && st.st_blocks == 0, "sparse, of the volume's size")
        #expect(try layer.loadMap().isEmpty)
        let log = try MapLog(path: layer.mapPath)
        try log.append([MapRecord(start: 0, count: 4, content: .data), MapRecord(start: 2, count: 4, content: .zero)])
        try log.append(MapRecord.records(100..<101, .data))
        try log.sync()
        #expect(try layer.loadMap().extents.map { "\($0.range):\($0.value)" } == ["0..<2:data", "2..<6:zero", "100..<101:data"])
        #expect(throws: (any Error).self) { try LayerFiles.create(in: directory, id: 7, size: 1 << 20) }
        try layer.remove()
        #expect(access(layer.dataPath, F_OK) != 0 && access(layer.mapPath, F_OK) != 0)
    }

    @Test func aTornTailIsCutSoThatAppendsGoOnAfterTheLastGoodRecord() throws {
        let directory = temporaryDirectory()
        defer { removeDirectory(directory) }
        let layer = try LayerFiles.create(in: directory, id: 1, size: 1 << 20)
        try MapLog(path: layer.mapPath).append([MapRecord(start: 0, count: 1, content: .data)])
        let fd = open(layer.mapPath, O_WRONLY | O_APPEND)
        #expect(write(fd, [UInt8](repeating: 0xAB, count: 9), 9) == 9)
        close(fd)
        #expect(try layer.loadMap().extents.map(\.range) == [0..<1])
        try MapLog(path: layer.mapPath).append([MapRecord(start: 5, count: 1, content: .data)])
        #expect(try layer.loadMap().extents.map(\.range) == [0..<1, 5..<6])
    }

}
