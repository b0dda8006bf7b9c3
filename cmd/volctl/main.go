// Command volctl drives volumed from a terminal or a script, through its
// REST API (package client).
//
//	volctl volume create --name N --size 5GiB --zone Z --disk-offering O [--metadata k=v]… [--wait]
//	volctl volume attach|attach-root ID --vm VM | detach|delete|get ID | list [--vm VM]
//	volctl op get|wait|watch ID | list [--type T] [--status S] [--volume V] [--vm VM] [--limit N]
//	volctl device ID | device --path /dev/vdb [--vm VM]
//	volctl export list | get ID | create ID [--read-write] | delete ID
//	volctl failover test|live --vm VM --root VOL [--data VOL]… [--no-start] [--force] | rollback OP
//	volctl sync | health | --version
//
// Every command takes --server URL (VOLCTL_SERVER, default
// http://127.0.0.1:8090), --token T (VOLCTL_TOKEN, sent as a bearer token),
// -o table|json, --nats URL (VOLCTL_NATS) for event-driven progress, and
// --nats-creds FILE (VOLCTL_NATS_CREDS, default
// ./volumed-data/creds/operator.creds when it exists): the NATS
// credentials for --nats, volumed's operator credentials
// (<data-dir>/creds/operator.creds). volumed's server refuses a client
// without them (authorization violation). --cacert FILE (VOLCTL_CACERT)
// is the CA of volumed's HTTPS API and NATS TLS, by default
// <data-dir>/tls/ca.pem of a volumed on this host.
// A command that starts an operation takes --wait: it shows the
// operation's steps on stderr (one live line on a terminal, a line per
// change otherwise), prints the final operation, and exits 1 unless it
// completed.
//
// These flags may also come before the command (volctl -o json health).
//
// Exit codes: 0 success; 1 an API error, a failed operation, a force-sync
// that could not check something or an unhealthy daemon; 2 a usage error.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"

	"github.com/volumed/volumed/client"
	"github.com/volumed/volumed/internal/version"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// Exit codes.
const (
	exitOK     = 0
	exitFailed = 1
	exitUsage  = 2
)

// usageError is a bad command line (exit 2).
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

// usagef returns a *usageError.
func usagef(format string, args ...any) error { return &usageError{fmt.Sprintf(format, args...)} }

// failedError is an operation that ended other than completed, or an
// unhealthy daemon (exit 1). shown says its message and details are on
// stderr already, so run does not print it again.
type failedError struct {
	msg   string
	shown bool
}

func (e *failedError) Error() string { return e.msg }

// run executes one command line and maps its outcome to an exit code, in
// one place.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	err := dispatch(ctx, args, stdout, stderr)
	var usage *usageError
	var apiErr *client.Error
	var failed *failedError
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &failed) && failed.shown:
		return exitFailed
	case errors.Is(err, errHelp):
		fmt.Fprint(stdout, usageText)
		return exitOK
	case errors.As(err, &usage):
		fmt.Fprintf(stderr, "volctl: %v\nRun 'volctl help' for usage.\n", err)
		return exitUsage
	case errors.As(err, &apiErr):
		fmt.Fprintf(stderr, "volctl: %v\n", apiErr)
		if d := apiErr.Details(); len(d) > 0 {
			fmt.Fprintf(stderr, "details: %s\n", compactJSON(d))
		}
		return exitFailed
	default:
		fmt.Fprintf(stderr, "volctl: %v\n", err)
		return exitFailed
	}
}

// dispatch parses the command and runs it.
func dispatch(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	args = globalsLast(args)
	if len(args) == 0 {
		return usagef("no command given")
	}
	if isHelp(args[0]) || (groups[args[0]] && len(args) > 1 && isHelp(args[1])) {
		return errHelp
	}
	switch args[0] {
	case "--version", "-version", "version":
		fmt.Fprintln(stdout, "volctl", version.String())
		return nil
	}
	group, rest := args[0], args[1:]
	sub := ""
	if _, ok := groups[group]; ok && len(rest) > 0 {
		sub, rest = rest[0], rest[1:]
	}
	cmd, ok := lookup(group, sub)
	if !ok {
		if sub == "" {
			return usagef("unknown command %q", group)
		}
		return usagef("unknown command %q %q", group, sub)
	}
	inv, err := parse(cmd, rest, stdout, stderr)
	if err != nil {
		return err
	}
	return cmd.run(ctx, inv)
}

// isHelp reports whether arg asks for the usage: `volctl help`, or a
// command group's, as in `volctl volume --help`.
func isHelp(arg string) bool {
	switch arg {
	case "help", "-h", "--help", "-help":
		return true
	}
	return false
}

// globalsLast moves the flags given before the command after it, where
// they are parsed: `volctl -o json health` is `volctl health -o json`.
// Every flag takes a value, in the next argument or after "=", but
// --wait.
func globalsLast(args []string) []string {
	i := 0
	for i < len(args) && strings.HasPrefix(args[i], "-") && args[i] != "-" && args[i] != "--" && !isHelp(args[i]) {
		name := strings.TrimLeft(args[i], "-")
		if name == "version" {
			break
		}
		if !strings.Contains(name, "=") && name != "wait" {
			i++ // the value
		}
		i++
	}
	if i == 0 || i > len(args) {
		return args
	}
	return append(slices.Clone(args[i:]), args[:i]...)
}
