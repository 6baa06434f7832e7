// Package systemd is rbee-hive's side of systemd: sd_notify and the watchdog
// for the hive itself (Notifier), a journald slog.Handler (NewLogHandler),
// a non-blocking sink that files worker output lines as journal entries
// (WorkerJournal), and the unit files in units/.
//
// Nothing here changes the process environment. NOTIFY_SOCKET, WATCHDOG_USEC
// and WATCHDOG_PID are read once by NewNotifier; workers must get their
// environment from an allow-list (never os.Environ()), so the hive's own
// NOTIFY_SOCKET never reaches them whatever os.Unsetenv does or when.
package systemd
