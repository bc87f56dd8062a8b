import ArgumentParser

struct FrontendCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "frontend",
        abstract: "Attach or detach a running volume's kernel device (/dev/nbdX).",
        subcommands: [Enable.self, Disable.self])

    struct Enable: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Attach the volume as /dev/nbdX again; prints the device.",
            discussion: "Example: keel frontend enable --engine 127.0.0.1:7900")

        @Option(help: "The engine's control address, HOST:PORT or unix:/path (its --control).")
        var engine: String

        @OptionGroup var control: ControlClientOptions

        func run() throws {
            control.apply(for: engine)
            let status = try callEngine(engine, doing: "attach its device") { try await $0.setFrontend(.with { $0.enabled = true }) }
            print(status.device)
        }
    }

    struct Disable: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Let the kernel's I/O in flight finish, then detach the device; the engine keeps running.",
            discussion: "Example: keel frontend disable --engine 127.0.0.1:7900")

        @Option(help: "The engine's control address, HOST:PORT or unix:/path (its --control).")
        var engine: String

        @OptionGroup var control: ControlClientOptions

        func run() throws {
            control.apply(for: engine)
            let status = try callEngine(engine, doing: "detach its device") { try await $0.setFrontend(.with { $0.enabled = false }) }
            print("volume \(status.volume): frontend disabled, no device")
        }
    }
}
