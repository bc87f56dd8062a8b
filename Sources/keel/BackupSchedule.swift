import ArgumentParser
import BackupStore
import Daemons
import Foundation
import S3Client
import Volumes

extension Backup {
    struct Schedule: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Recurring backups of a volume as a systemd timer: keel backup schedule VOL --name NAME --target URL (--every 1h | --on-calendar SPEC) --keep N.",
            discussion: """
                Each schedule is a timer and a oneshot service (keel-backup:VOL:NAME) that runs keel backup create \\
                with --schedule NAME --keep N, for attached and detached volumes alike; several per volume. S3 \\
                credentials (from the environment or ~/.aws, as keel backup create takes them) go into a root-only \\
                file the service loads (LoadCredential=), never into a unit. Where systemd is not PID 1 the command \\
                refuses and prints the cron line to use instead.
                Examples: keel backup schedule db --name hourly --target file:///mnt/backups --every 1h --keep 24
                          keel backup schedule db --name nightly --target s3://backups/db --on-calendar '*-*-* 02:30' --keep 14
                          keel backup schedule ls
                          keel backup schedule rm db --name hourly
                """,
            subcommands: [Add.self, List.self, Remove.self], defaultSubcommand: Add.self)
    }
}

extension Backup.Schedule {
    struct Add: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "add", abstract: "Install a schedule (the default subcommand).")

        @Argument(help: "The volume of this node to back up.")
        var volume: String

        @Option(help: ArgumentHelp("The schedule's name (\(ScheduleName.rule)); its backups are marked with it.", valueName: "name"))
        var name: String

        @OptionGroup var store: Backup.Store

        @Option(help: ArgumentHelp("Every so long from now on: 30s, 15m, 1h, 1d.", valueName: "interval"))
        var every: String?

        @Option(name: .customLong("on-calendar"), help: ArgumentHelp("A systemd calendar event (man systemd.time): daily, '*-*-* 02:30', 'Mon *-*-* 03:00'.", valueName: "spec"))
        var onCalendar: String?

        @Option(help: "How many of the schedule's backups to keep: the oldest beyond go after each backup.")
        var keep: Int

        @OptionGroup var node: NodeOptions

        func validate() throws {
            guard ScheduleName.isValid(name) else { throw ValidationError("'\(name)' is not a schedule name: use \(ScheduleName.rule)") }
            guard (every == nil) != (onCalendar == nil) else { throw ValidationError("give when: --every INTERVAL or --on-calendar SPEC") }
            if let every {
                guard let seconds = BackupSchedule.parseInterval(every), seconds >= 10 else {
                    throw ValidationError("--every takes 10s or more as a count and a unit: 30s, 15m, 1h or 1d, not '\(every)'")
                }
            }
            guard keep >= 1 else { throw ValidationError("--keep takes 1 or more") }
        }

        func run() throws {
            let node = try Node(self.node)
            _ = try node.volume(volume)
            let timing: BackupSchedule.Timing = every.flatMap(BackupSchedule.parseInterval).map { .every(seconds: $0) } ?? .calendar(onCalendar!)
            var schedule = BackupSchedule(volume: volume, name: name, target: store.target, timing: timing, keep: keep,
                                          stateDirectory: node.layout.stateDirectory, executable: currentExecutable())
            guard systemdIsRunning() else {
                throw KeelError("systemd is not PID 1 on this host, so no timer can be installed; run the backup from cron instead, "
                    + "e.g. this line in /etc/cron.d/keel-backups: \(schedule.cronLine)")
            }
            if let onCalendar, let problem = BackupScheduleInstaller.calendarProblem(onCalendar) {
                throw KeelError("'\(onCalendar)' is not a systemd calendar event (\(problem)); see man systemd.time, e.g. daily or '*-*-* 02:30'")
            }
            _ = try store.open(create: true)  // an unreachable store or wrong credentials are told now, not at the first run
            var credentials: String?
            if store.target.hasPrefix("s3://") {
                let settings: S3Settings
                do { settings = try S3Settings.fromEnvironment() } catch { throw KeelError("\(error)") }
                credentials = "[default]\naws_access_key_id = \(settings.accessKey)\naws_secret_access_key = \(settings.secretKey)\n"
                schedule.loadsCredentials = true
                schedule.environment = ["AWS_REGION": settings.region, "AWS_ENDPOINT_URL": settings.endpoint]
            }
            do { try BackupScheduleInstaller().install(schedule, credentials: credentials) } catch let error as DaemonError {
                throw KeelError(error.description)
            }
            print("schedule \(name) of \(volume) installed: \(Self.when(schedule.timing)) to \(store.target), keeping \(keep); "
                + "timer \(schedule.unit).timer (systemctl list-timers 'keel-backup:*')")
        }

        static func when(_ timing: BackupSchedule.Timing) -> String {
            switch timing {
            case .every(let seconds): "every \(BackupSchedule.intervalText(seconds))"
            case .calendar(let spec): "on \(spec)"
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "List the backup schedules of this host (of VOL).")

        @Argument(help: "Only this volume's schedules.")
        var volume: String?

        @Flag(help: "Print JSON.")
        var json = false

        func run() throws {
            let installer = BackupScheduleInstaller()
            let schedules = installer.list(executable: currentExecutable()).filter { volume == nil || $0.volume == volume }
            let rows = schedules.map { schedule -> [String: Any] in
                let state = installer.state(of: schedule)
                return ["volume": schedule.volume, "name": schedule.name, "target": schedule.target, "when": Add.when(schedule.timing),
                        "keep": schedule.keep, "unit": schedule.unit, "timer": state?.active ?? NSNull(),
                        "last_result": state?.lastResult ?? NSNull()]
            }
            if json { return try printJSON(rows) }
            guard !rows.isEmpty else { return print("no backup schedule\(volume.map { " of \($0)" } ?? "")") }
            print("VOLUME        SCHEDULE      WHEN                  KEEP  TIMER     TARGET")
            for row in rows {
                print((row["volume"] as! String).padding(toLength: 12, withPad: " ", startingAt: 0) + "  "
                    + (row["name"] as! String).padding(toLength: 12, withPad: " ", startingAt: 0) + "  "
                    + (row["when"] as! String).padding(toLength: 20, withPad: " ", startingAt: 0) + "  "
                    + "\(row["keep"]!)".padding(toLength: 4, withPad: " ", startingAt: 0) + "  "
                    + ((row["timer"] as? String) ?? "-").padding(toLength: 8, withPad: " ", startingAt: 0) + "  " + (row["target"] as! String))
            }
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "rm", abstract: "Remove a schedule: its timer, service and credentials (its backups stay in the store).")

        @Argument(help: "The volume.")
        var volume: String

        @Option(help: "The schedule's name.")
        var name: String

        func run() throws {
            let removed: Bool
            do { removed = try BackupScheduleInstaller().remove(volume: volume, name: name) } catch let error as DaemonError {
                throw KeelError(error.description)
            }
            guard removed else { throw KeelError("no schedule \(name) of \(volume) on this host; see keel backup schedule ls") }
            print("schedule \(name) of \(volume) removed; its backups stay in the store")
        }
    }
}

/// The path of the running keel binary, for units that run it again.
func currentExecutable() -> String {
    (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
}
