import LayerStack
import Testing

@Suite struct MapRecordTests {
    private func log(_ records: [MapRecord]) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: records.count * MapRecord.size)
        bytes.withUnsafeMutableBytes { buffer in
            for (i, record) in records.enumerated() {
                record.encode(into: UnsafeMutableRawBufferPointer(rebasing: buffer[i * MapRecord.size..<(i + 1) * MapRecord.size]))
            }
        }
        return bytes
    }

    @Test func aLogReplaysToTheMapItRecorded() {
        let records = [MapRecord(start: 0, count: 100, content: .data), MapRecord(start: 10, count: 5, content: .zero),
                       MapRecord(start: 50, count: 10, content: nil), MapRecord(start: 1 << 40, count: 1, content: .data)]
        let (map, count) = log(records).withUnsafeBytes { MapRecord.replay($0) }
        #expect(count == 4)
        #expect(map.extents.map { "\($0.start)-\($0.end):\($0.value)" }
                == ["0-10:data", "10-15:zero", "15-50:data", "60-100:data", "1099511627776-1099511627777:data"])
    }

    @Test func replaySkipsTornOrUnwrittenSlotsAndReportsTheLastGoodOne() {
        var bytes = log([MapRecord(start: 0, count: 8, content: .data), MapRecord(start: 8, count: 8, content: .data),
                         MapRecord(start: 16, count: 8, content: .data)])
        // The middle append was cut (another thread's, after it, was written); the tail was never written.
        bytes[MapRecord.size + 3] ^= 0x40
        bytes += [UInt8](repeating: 0, count: 40)
        let (map, slots) = bytes.withUnsafeBytes { MapRecord.replay($0) }
        #expect(slots == 3)
        #expect(map.extents.map(\.range) == [0..<8, 16..<24])
    }

    @Test func aRunLongerThanOneRecordTakesSeveral() {
        let records = MapRecord.records(5..<(5 + MapRecord.maxBlocks + 3), .zero)
        #expect(records.count == 2)
        #expect(records[1].start == 5 + MapRecord.maxBlocks && records[1].count == 3)
    }
}
