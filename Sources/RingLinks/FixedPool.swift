/// Records that never move (libnbd holds their addresses as callback
/// contexts), handed out from blocks allocated once and kept until the pool
/// goes: no allocation per request once the pool has grown.
public final class FixedPool<Record> {
    private let blockSize: Int
    private let empty: () -> Record
    private var blocks: [UnsafeMutablePointer<Record>] = []
    private var free: [UnsafeMutablePointer<Record>] = []

    /// `empty` makes the value each new record starts as.
    public init(blockSize: Int, empty: @escaping () -> Record) {
        precondition(blockSize > 0)
        self.blockSize = blockSize
        self.empty = empty
    }

    deinit {
        for block in blocks {
            block.deinitialize(count: blockSize)
            block.deallocate()
        }
    }

    public func take() -> UnsafeMutablePointer<Record> {
        if let record = free.popLast() { return record }
        let block = UnsafeMutablePointer<Record>.allocate(capacity: blockSize)
        block.initialize(repeating: empty(), count: blockSize)
        blocks.append(block)
        free.reserveCapacity(blocks.count * blockSize)
        for k in stride(from: blockSize - 1, to: 0, by: -1) { free.append(block + k) }
        return block
    }

    public func give(_ record: UnsafeMutablePointer<Record>) {
        free.append(record)
    }

    /// Every record ever handed out or ready to be, in use or not.
    public func forEach(_ body: (UnsafeMutablePointer<Record>) -> Void) {
        for block in blocks {
            for k in 0..<blockSize { body(block + k) }
        }
    }
}
