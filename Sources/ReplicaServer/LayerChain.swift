import FileExport
import LayerStack
import Logging
import Synchronization
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// A replica's chain of layers, open: each layer's data file, the index of
/// what each layer records and where each block is read from, and the head's
/// map log, which the I/O threads append to.
public final class LayerChain: @unchecked Sendable {
    public struct Layer {
        public let id: LayerID
        public let data: FileDevice
    }

    public struct OpenError: Error, CustomStringConvertible {
        public let description: String
    }

    public let size: UInt64
    public let layers: [Layer]
    public let index: Mutex<LayerIndex>
    /// The head's map log, written by the I/O threads at `logEnd`.
    let headLog: FileDescriptor
    private let logEnd: Atomic<Int64>

    /// Opens layers given oldest first, the head last, with their files;
    /// replays their map logs (cutting torn tails).
    public init(size: UInt64, layers: [(id: LayerID, files: LayerFiles)], logger: Logger) throws {
        precondition(!layers.isEmpty)
        self.size = size
        var opened: [Layer] = []
        var indexed: [LayerStack.Layer] = []
        for (id, files) in layers {
            let data = try FileDevice(path: files.dataPath, readOnly: id != layers.last!.id, logger: logger)
            guard data.size == size else {
                throw OpenError(description: "layer file \(files.dataPath) holds \(data.size) bytes, not the volume's \(size)")
            }
            opened.append(Layer(id: id, data: data))
            indexed.append(LayerStack.Layer(id: id, map: try files.loadMap()))
        }
        self.layers = opened
        index = Mutex(LayerIndex(layers: indexed))
        let head = layers.last!.files.mapPath
        let fd = open(head, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError.current("open \(head)") }
        headLog = FileDescriptor(rawValue: fd)
        logEnd = Atomic(Int64(lseek(fd, 0, SEEK_END)))
    }

    deinit { headLog.close() }

    public var head: Layer { layers[layers.count - 1] }

    /// Where blocks no layer records are read from: its map records only zeroes.
    public var bottom: Layer { layers[0] }

    func layer(_ id: LayerID) -> Layer {
        // Chains are short next to a request's cost; the head is the usual answer.
        if head.id == id { return head }
        return layers.first { $0.id == id }!
    }

    /// Where the next record of the head's log goes: each record has its own
    /// place, so threads append without a lock (replay skips none: an append
    /// not yet written is an unacknowledged write's, and reads as torn).
    func nextLogOffset(records: Int) -> UInt64 {
        UInt64(logEnd.add(Int64(records * MapRecord.size), ordering: .relaxed).oldValue)
    }

    /// Head data and map log on stable storage.
    public func flush() throws {
        try head.data.flush()
        try headLog.fdatasync()
    }
}
