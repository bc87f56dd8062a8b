import ArgumentParser
import Syscalls
import Volumes
#if canImport(Glibc)
import Glibc
#endif

@main
struct Keel: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "keel",
        abstract: "Replicated block storage served over NBD.",
        subcommands: [Volume.self, Migrate.self, Snapshot.self, Backup.self, Export.self, Replica.self, EngineCommand.self, FrontendCommand.self, NodeCommand.self, Status.self,
                      CA.self, Cert.self])

    /// Every failure ends in one line on stderr and a non-zero exit.
    static func main() {
        raiseOpenFileLimitToHard()
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch let error as KeelError {
            fputs("keel: \(error.message)\n", stderr)
            Glibc.exit(1)
        } catch {
            let code = exitCode(for: error)
            if code == .success {
                print(fullMessage(for: error))
                Glibc.exit(0)
            }
            let message = self.message(for: error).split(separator: "\n").first.map(String.init) ?? "\(error)"
            fputs("keel: \(message) (see 'keel --help')\n", stderr)
            Glibc.exit(code.rawValue == 0 ? 2 : code.rawValue)
        }
    }
}

/// What node agents report, so that a cluster can tell its nodes' builds apart.
let keelVersion = "0.13.0"
