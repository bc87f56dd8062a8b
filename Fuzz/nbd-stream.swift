// libFuzzer's entry point for whole NBD client streams (see StreamReplay);
// built by Bench/fuzz with `swiftc -sanitize=fuzzer,address`.
import NBDStreamReplay

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzNBDStream(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    _ = StreamReplay.run(UnsafeRawBufferPointer(start: data, count: size))
    return 0
}
