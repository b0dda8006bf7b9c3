package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/client"
	"github.com/volumed/volumed/commands"
)

// errHelp asks for the usage text.
var errHelp = errors.New("help")

// usageText is volctl's help.
const usageText = `volctl drives volumed through its REST API.

Usage:
  volctl volume create --name N --size 5GiB --zone Z --disk-offering O [--metadata k=v]... [--wait]
  volctl volume create --name N --snapshot S [--size 5GiB] [--metadata k=v]... [--wait]
  volctl volume attach ID --vm VM [--wait]
  volctl volume attach-root ID --vm VM [--wait]
  volctl volume detach ID [--force] [--wait]
  volctl volume delete ID [--force] [--wait]
  volctl volume get ID
  volctl volume list [--vm VM] [--tag k=v]... [--name N]
  volctl volume snapshot ID [--name N] [--wait]
  volctl volume snapshots ID
  volctl volume revert ID --snapshot S [--wait]
  volctl volume resize ID --size 10GiB [--shrink-ok] [--wait]
  volctl volume tags ID [--tag k=v]... [--wait]
  volctl snapshot get ID | delete ID [--wait]
  volctl failover test --vm VM --root VOL [--data VOL]... [--no-start] [--force] [--wait]
  volctl failover live --vm VM --root VOL [--data VOL]... [--no-start] [--force] [--wait]
  volctl failover rollback OP [--wait]
  volctl op get ID
  volctl op wait ID
  volctl op watch ID
  volctl op list [--type T] [--status S] [--volume V] [--vm VM] [--requested-by WHO] [--limit N] [--cursor C]
  volctl device ID | volctl device --path /dev/vdb [--vm VM]
  volctl export list | get ID | create ID [--read-write] [--wait] | delete ID [--wait]
  volctl sync
  volctl health
  volctl --version

Flags of every command (after it or before it: volctl -o json health):
  --server URL   volumed's address (VOLCTL_SERVER, default http://127.0.0.1:8090)
  --token T      bearer token (VOLCTL_TOKEN)
  -o FORMAT      table (default) or json
  --nats URL     volumed's NATS bus (VOLCTL_NATS): op watch and --wait follow
                 the operation's events instead of polling
  --nats-creds F NATS credentials for --nats (VOLCTL_NATS_CREDS, default
                 ./volumed-data/creds/operator.creds when it exists)
  --cacert F     CA certificate of volumed's HTTPS API and NATS (VOLCTL_CACERT,
                 default <data-dir>/tls/ca.pem of a volumed on this host:
                 $VOLUMED_DATA_DIR, ./volumed-data or /var/lib/volumed)
  --timeout D    give up after D (a Go duration; default none)

Flags of the commands that start an operation (create, attach, attach-root,
detach, delete, snapshot, revert, resize, tags, snapshot delete, export
create, export delete, failover test, failover live, failover rollback):
  --wait              wait for the operation to end, showing its steps
  --idempotency-key K send K as the Idempotency-Key: the command sent again
                      with the same K answers the same operation (another
                      command or body with K: 409 CONFLICT)

detach and delete refuse (the operation fails with CONFLICT naming who) a
volume in use on its VM: mounted, held by dm or md, open by a process, or
its NBD export with clients. --force goes ahead: it cuts the export's
clients, and data not yet written is lost.

failover test moves the volumes onto the stopped VM --vm (--root as its
root disk, each --data after it in order), taking a snapshot of each first,
and starts the VM (not with --no-start); failover rollback OP puts them
back. failover live takes no snapshots and cannot be rolled back. Without
--force a volume in use on its host makes the failover fail before any step.

--wait shows the operation's steps on stderr, prints the final operation
and exits 1 unless it completed (with -o json: the operation's JSON). For a
failover or rollback it shows each step as it runs ([done/total] step,
volume, VM), then the snapshots and where each volume was, or, when it
failed, whether what it did was undone (compensated) and what is left where.
volume list lists CloudStack's volumes that match --tag, --name and --vm
(GET /volumes; with --vm alone, GET /vms/{id}/volumes). volume tags sets
the volume's tags to exactly the --tag pairs given (none: removes them
all).
Exit codes: 0 success; 1 API error, failed operation, a sync that could not
check something or unhealthy daemon; 2 usage.
`

// globals are the flags of every command.
type globals struct {
	server, token, output, nats, natsCreds string
	cacert                                 string
	idempotencyKey                         string
	wait                                   bool
	timeout                                time.Duration
}

// opts are the command-specific flags.
type opts struct {
	name, size, zone, offering, vm, path string
	typ, status, volume, cursor          string
	requestedBy                          string
	limit                                int
	readWrite, shrinkOK, force           bool
	snapshot                             string
	metadata, tags                       metadataFlag
	root                                 string
	data                                 listFlag
	noStart                              bool
}

// invocation is one parsed command line.
type invocation struct {
	c        *client.Client
	nc       *nats.Conn
	args     []string
	g        globals
	o        opts
	out, err io.Writer
}

// command is one volctl command.
type command struct {
	group, name string
	// args names the required positional arguments.
	args []string
	// optionalArg allows one optional positional argument instead.
	optionalArg bool
	// op commands start an operation and take --wait.
	op    bool
	flags func(fs *flag.FlagSet, o *opts)
	run   func(ctx context.Context, in *invocation) error
}

// groups are the commands that take a subcommand.
var groups = map[string]bool{"volume": true, "op": true, "export": true, "snapshot": true, "failover": true}

func vmFlag(fs *flag.FlagSet, o *opts) { fs.StringVar(&o.vm, "vm", "", "VM id") }

func forceFlag(fs *flag.FlagSet, o *opts) {
	fs.BoolVar(&o.force, "force", false, "go ahead although the volume is in use (cuts NBD clients; data not yet written is lost)")
}

// forced adds client.WithForce to o when --force was given.
func (in *invocation) forced(o []client.CallOption) []client.CallOption {
	if in.o.force {
		return append(o, client.WithForce())
	}
	return o
}

var commandList = []command{
	{group: "volume", name: "create", op: true, flags: func(fs *flag.FlagSet, o *opts) {
		fs.StringVar(&o.name, "name", "", "volume name (required)")
		fs.StringVar(&o.size, "size", "", "size: bytes or with a unit, e.g. 5GiB (required)")
		fs.StringVar(&o.zone, "zone", "", "zone id (required)")
		fs.StringVar(&o.offering, "disk-offering", "", "disk offering id (required)")
		fs.Var(&o.metadata, "metadata", "k=v, repeatable: the volume's tags")
		fs.StringVar(&o.snapshot, "snapshot", "", "make the volume from this snapshot (--size, --zone and --disk-offering optional then)")
	}, run: func(ctx context.Context, in *invocation) error {
		req, err := in.o.createRequest()
		if err != nil {
			return err
		}
		return in.operation(ctx, func(ctx context.Context, o ...client.CallOption) (commands.Operation, error) {
			return in.c.CreateVolume(ctx, req, o...)
		})
	}},
	{group: "volume", name: "attach", args: []string{"ID"}, op: true, flags: vmFlag, run: func(ctx context.Context, in *invocation) error {
		if in.o.vm == "" {
			return usagef("volume attach: --vm is required")
		}
		return in.operation(ctx, func(ctx context.Context, o ...client.CallOption) (commands.Operation, error) {
			return in.c.AttachVolume(ctx, in.args[0], in.o.vm, o...)
		})
	}},
	{group: "volume", name: "attach-root", args: []string{"ID"}, op: true, flags: vmFlag, run: func(ctx context.Context, in *invocation) error {
		if in.o.vm == "" {
			return usagef("volume attach-root: --vm is required")
		}
		return in.operation(ctx, func(ctx context.Context, o ...client.CallOption) (commands.Operation, error) {
			return in.c.AttachRoot(ctx, in.args[0], in.o.vm, o...)
		})
	}},
	{group: "volume", name: "detach", args: []string{"ID"}, op: true, flags: forceFlag, run: func(ctx context.Context, in *invocation) error {
		return in.operation(ctx, func(ctx context.Context, o ...client.CallOption) (commands.Operation, error) {
			return in.c.DetachVolume(ctx, in.args[0], in.forced(o)...)
		})
	}},
	{group: "volume", name: "delete", args: []string{"ID"}, op: true, flags: forceFlag, run: func(ctx context.Context, in *invocation) error {
		return in.operation(ctx, func(ctx context.Context, o ...client.CallOption) (commands.Operation, error) {
			return in.c.DeleteVolume(ctx, in.args[0], in.forced(o)...)
		})
	}},
	{group: "volume", name: "get", args: []string{"ID"}, run: func(ctx context.Context, in *invocation) error {
		v, err := in.c.GetVolume(ctx, in.args[0])
		if err != nil {
			return err
		}
		return in.print(v, volumeRows([]commands.VolumeStatus{v}))
	}},
	{group: "volume", name: "list", flags: func(fs *flag.FlagSet, o *opts) {
		vmFlag(fs, o)
		fs.Var(&o.tags, "tag", "k=v, repeatable: only volumes with these tags")
		fs.StringVar(&o.name, "name", "", "only volumes of this name")
	}, run: func(ctx context.Context, in *invocation) error {
		// GET /volumes, whose rows carry CloudStack's record (the name);
		// GET /vms/{id}/volumes, whose rows do not, only says whether a
		// VM without volumes exists (CloudStack refuses to list by a VM
		// it does not know: NOT_FOUND then, not its refusal).
		list, err := listVolumes(ctx, in)
		if (err != nil || len(list) == 0) && in.o.vm != "" {
			if _, verr := in.c.VMVolumes(ctx, in.o.vm); verr != nil {
				err = verr
			}
		}
		if err != nil {
			return err
		}
		return in.print(list, volumeRows(list))
	}},
	{group: "volume", name: "snapshot", args: []string{"ID"}, op: true, flags: func(fs *flag.FlagSet, o *opts) {
		fs.StringVar(&o.name, "name", "", "the snapshot's name (default: derived from the operation's id)")
	}, run: func(ctx context.Context, in *invocation) error {
		return in.operation(ctx, func(ctx context.Context, o ...client.CallOption) (commands.Operation, error) {
			return in.c.Snapshot(ctx, in.args[0], in.o.name, o...)
		})
	}},
	{group: "volume", name: "snapshots", args: []string{"ID"}, run: func(ctx context.Context, in *invocation) error {
		list, err := in.c.VolumeSnapshots(ctx, in.args[0])
		if err != nil {
			return err
		}
		return in.print(list, snapshotRows(list))
	}},
	{group: "volume", name: "revert", args: []string{"ID"}, op: true, flags: func(fs *flag.FlagSet, o *opts) {
		fs.StringVar(&o.snapshot, "snapshot", "", "the snapshot to revert to (required)")
	}, run: func(ctx context.Context, in *invocation) error {
		if in.o.snapshot == "" {
			return usagef("volume revert: --snapshot is required")
		}
		return in.operation(ctx, func(ctx context.Context, o ...client.CallOption) (commands.Operation, error) {
			return in.c.Revert(ctx, in.args[0], in.o.snapshot, o...)
		})
	}},
	{group: "volume", name: "resize", args: []string{"ID"}, op: true, flags: func(fs *flag.FlagSet, o *opts) {
		fs.StringVar(&o.size, "size", "", "the new size: bytes or with a unit, e.g. 10GiB (required)")
		fs.BoolVar(&o.shrinkOK, "shrink-ok", false, "allow a smaller size")
	}, run: func(ctx context.Context, in *invocation) error {
		if in.o.size == "" {
			return usagef("volume resize: --size is required")
		}
		size, err := parseSize(in.o.size)
		if err != nil {
			return usagef("--size: %v", err)
		}
		return in.operation(ctx, func(ctx context.Context, o ...client.CallOption) (commands.Operation, error) {
			return in.c.Resize(ctx, in.args[0], size, in.o.shrinkOK, o...)
		})
	}},
	{group: "volume", name: "tags", args: []string{"ID"}, op: true, flags: func(fs *flag.FlagSet, o *opts) {
		fs.Var(&o.tags, "tag", "k=v, repeatable: the volume's tags once done, exactly")
	}, run: func(ctx context.Context, in *invocation) error {
		return in.operation(ctx, func(ctx context.Context, o ...client.CallOption) (commands.Operation, error) {
			return in.c.SetTags(ctx, in.args[0], in.o.tags, o...)
		})
	}},
	{group: "snapshot", name: "get", args: []string{"ID"}, run: func(ctx context.Context, in *invocation) error {
		s, err := in.c.GetSnapshot(ctx, in.args[0])
		if err != nil {
			return err
		}
		return in.print(s, snapshotRows([]commands.Snapshot{s}))
	}},
	{group: "snapshot", name: "delete", args: []string{"ID"}, op: true, run: func(ctx context.Context, in *invocation) error {
		return in.operation(ctx, func(ctx context.Context, o ...client.CallOption) (commands.Operation, error) {
			return in.c.DeleteSnapshot(ctx, in.args[0], o...)
		})
	}},
	{group: "failover", name: "test", op: true, flags: failoverFlags, run: func(ctx context.Context, in *invocation) error {
		return in.failover(ctx, "failover test", true)
	}},
	{group: "failover", name: "live", op: true, flags: failoverFlags, run: func(ctx context.Context, in *invocation) error {
		return in.failover(ctx, "failover live", false)
	}},
	{group: "failover", name: "rollback", args: []string{"OP"}, op: true, run: func(ctx context.Context, in *invocation) error {
		return in.operation(ctx, func(ctx context.Context, o ...client.CallOption) (commands.Operation, error) {
			return in.c.Rollback(ctx, in.args[0], o...)
		})
	}},
	{group: "op", name: "get", args: []string{"ID"}, run: func(ctx context.Context, in *invocation) error {
		op, err := in.c.GetOperation(ctx, in.args[0])
		if err != nil {
			return err
		}
		return in.print(op, operationFields(op))
	}},
	{group: "op", name: "wait", args: []string{"ID"}, run: func(ctx context.Context, in *invocation) error {
		return in.waitAndPrint(ctx, in.args[0])
	}},
	{group: "op", name: "watch", args: []string{"ID"}, run: func(ctx context.Context, in *invocation) error {
		return in.watch(ctx, in.args[0])
	}},
	{group: "op", name: "list", flags: func(fs *flag.FlagSet, o *opts) {
		fs.StringVar(&o.typ, "type", "", "only this type")
		fs.StringVar(&o.status, "status", "", "only this status")
		fs.StringVar(&o.volume, "volume", "", "only this volume")
		fs.StringVar(&o.vm, "vm", "", "only this VM")
		fs.StringVar(&o.requestedBy, "requested-by", "", "only those this principal asked for (requested_by)")
		fs.IntVar(&o.limit, "limit", 0, "at most this many (the server's default when 0)")
		fs.StringVar(&o.cursor, "cursor", "", "continue after this cursor (printed by the previous page)")
	}, run: listOperations},
	{group: "device", optionalArg: true, flags: func(fs *flag.FlagSet, o *opts) {
		fs.StringVar(&o.path, "path", "", "a device path, e.g. /dev/vdb, instead of a volume id")
		fs.StringVar(&o.vm, "vm", "", "with --path: the VM of the device (default volumed's host)")
	}, run: func(ctx context.Context, in *invocation) error {
		var m commands.Mapping
		var err error
		switch {
		case in.o.path != "" && len(in.args) == 0:
			m, err = in.c.DeviceVolume(ctx, in.o.path, in.o.vm)
		case in.o.path == "" && len(in.args) == 1 && in.o.vm == "":
			m, err = in.c.VolumeDevice(ctx, in.args[0])
		default:
			return usagef("device: give a volume ID, or --path P [--vm VM]")
		}
		if err != nil {
			return err
		}
		return in.print(m, mappingFields(m))
	}},
	{group: "export", name: "list", run: func(ctx context.Context, in *invocation) error {
		list, err := in.c.Exports(ctx)
		if err != nil {
			return err
		}
		return in.print(list, exportRows(list))
	}},
	{group: "export", name: "get", args: []string{"ID"}, run: func(ctx context.Context, in *invocation) error {
		e, err := in.c.Export(ctx, in.args[0])
		if err != nil {
			return err
		}
		return in.print(e, exportRows([]commands.Export{e}))
	}},
	{group: "export", name: "create", args: []string{"ID"}, op: true, flags: func(fs *flag.FlagSet, o *opts) {
		fs.BoolVar(&o.readWrite, "read-write", false, "export read-write (default read-only)")
	}, run: func(ctx context.Context, in *invocation) error {
		return in.operation(ctx, func(ctx context.Context, o ...client.CallOption) (commands.Operation, error) {
			return in.c.CreateExport(ctx, commands.ExportRequest{VolumeID: in.args[0], ReadOnly: !in.o.readWrite}, o...)
		})
	}},
	{group: "export", name: "delete", args: []string{"ID"}, op: true, run: func(ctx context.Context, in *invocation) error {
		return in.operation(ctx, func(ctx context.Context, o ...client.CallOption) (commands.Operation, error) {
			return in.c.DeleteExport(ctx, in.args[0], o...)
		})
	}},
	{group: "sync", run: func(ctx context.Context, in *invocation) error {
		r, err := in.c.ForceSync(ctx)
		if err != nil {
			return err
		}
		if err := in.print(r, syncRows(r)); err != nil {
			return err
		}
		if len(r.Errors) > 0 {
			return &failedError{msg: fmt.Sprintf("force sync could not check %d thing(s)", len(r.Errors))}
		}
		return nil
	}},
	{group: "health", run: func(ctx context.Context, in *invocation) error {
		h, err := in.c.Health(ctx)
		if err != nil {
			return err
		}
		if err := in.print(h, healthRows(h)); err != nil {
			return err
		}
		if h.Status == commands.Unhealthy {
			return &failedError{msg: "volumed is unhealthy"}
		}
		return nil
	}},
}

// lookup finds a command by group and subcommand.
func lookup(group, sub string) (command, bool) {
	for _, c := range commandList {
		if c.group == group && (c.name == sub || !groups[group]) {
			return c, true
		}
	}
	return command{}, false
}

// parse reads a command's flags and arguments, interleaved in any order,
// and connects the client.
func parse(cmd command, args []string, stdout, stderr io.Writer) (*invocation, error) {
	in := &invocation{out: stdout, err: stderr}
	label := strings.TrimSpace(cmd.group + " " + cmd.name)
	fs := flag.NewFlagSet("volctl "+label, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&in.g.server, "server", envOr("VOLCTL_SERVER", client.DefaultServer), "volumed's URL")
	fs.StringVar(&in.g.token, "token", os.Getenv("VOLCTL_TOKEN"), "bearer token")
	fs.StringVar(&in.g.output, "o", "table", "output: table or json")
	fs.StringVar(&in.g.nats, "nats", os.Getenv("VOLCTL_NATS"), "volumed's NATS URL, for events")
	fs.StringVar(&in.g.natsCreds, "nats-creds", envOr("VOLCTL_NATS_CREDS", defaultNATSCreds()), "NATS credentials file")
	fs.StringVar(&in.g.cacert, "cacert", envOr("VOLCTL_CACERT", client.DefaultCA()), "CA certificate of volumed's HTTPS and NATS")
	fs.DurationVar(&in.g.timeout, "timeout", 0, "give up after this long")
	if cmd.op {
		fs.BoolVar(&in.g.wait, "wait", false, "wait for the operation to end, showing its steps")
		fs.StringVar(&in.g.idempotencyKey, "idempotency-key", "", "the command's Idempotency-Key: the same key and command answer the same operation")
	}
	if cmd.flags != nil {
		cmd.flags(fs, &in.o)
	}
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, errHelp
			}
			return nil, usagef("%s: %v", label, err)
		}
		if fs.NArg() == 0 {
			break
		}
		in.args = append(in.args, fs.Arg(0))
		args = fs.Args()[1:]
	}
	switch {
	case cmd.optionalArg && len(in.args) > 1:
		return nil, usagef("%s: at most one argument, got %d", label, len(in.args))
	case !cmd.optionalArg && len(in.args) != len(cmd.args):
		return nil, usagef("%s: want %d argument(s) %v, got %d", label, len(cmd.args), cmd.args, len(in.args))
	}
	if err := commands.ValidateIdempotencyKey(in.g.idempotencyKey); err != nil {
		return nil, usagef("--idempotency-key: %v", err)
	}
	if in.g.output != "table" && in.g.output != "json" {
		return nil, usagef("-o: want table or json, got %q", in.g.output)
	}
	opts := []client.Option{client.WithToken(in.g.token),
		client.WithHTTPClient(&http.Client{Timeout: client.WaitSlice + 30*time.Second})}
	var tlsConfig *tls.Config
	if in.g.cacert != "" {
		roots, err := client.LoadCA(in.g.cacert)
		if err != nil {
			return nil, usagef("--cacert: %v", err)
		}
		opts, tlsConfig = append(opts, client.WithRootCAs(roots)), client.TLSConfig(roots)
	}
	if in.g.nats != "" {
		natsOpts := []nats.Option{nats.Name("volctl"), nats.Timeout(5 * time.Second), func(o *nats.Options) error {
			// TLS when the server asks for it or the URL is tls://.
			o.TLSConfig = tlsConfig
			return nil
		}}
		if in.g.natsCreds != "" {
			natsOpts = append(natsOpts, nats.UserCredentials(in.g.natsCreds))
		}
		nc, err := nats.Connect(in.g.nats, natsOpts...)
		if errors.Is(err, nats.ErrAuthorization) {
			return nil, fmt.Errorf("connect to NATS %s: %w: pass --nats-creds with the operator credentials (<data-dir>/creds/operator.creds)",
				in.g.nats, err)
		}
		if err != nil {
			return nil, fmt.Errorf("connect to NATS %s: %w", in.g.nats, err)
		}
		in.nc = nc
		opts = append(opts, client.WithNATS(nc))
	}
	c, err := client.New(in.g.server, opts...)
	if err != nil {
		return nil, usagef("--server: %v", err)
	}
	in.c = c
	return in, nil
}

// envOr is the environment variable name, or def when unset or empty.
func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// createRequest validates the flags of volume create.
func (o *opts) createRequest() (commands.CreateRequest, error) {
	var missing []string
	required := map[string]string{"--name": o.name, "--size": o.size, "--zone": o.zone, "--disk-offering": o.offering}
	if o.snapshot != "" {
		required = map[string]string{"--name": o.name}
	}
	for flagName, v := range required {
		if v == "" {
			missing = append(missing, flagName)
		}
	}
	if len(missing) > 0 {
		return commands.CreateRequest{}, usagef("volume create: %s required", strings.Join(slices.Sorted(slices.Values(missing)), ", "))
	}
	var size int64
	if o.size != "" {
		var err error
		if size, err = parseSize(o.size); err != nil {
			return commands.CreateRequest{}, usagef("--size: %v", err)
		}
	}
	req := commands.CreateRequest{Name: o.name, Size: size, ZoneID: o.zone, DiskOfferingID: o.offering, SnapshotID: o.snapshot}
	if len(o.metadata) > 0 {
		req.Metadata = map[string]any{}
		for k, v := range o.metadata {
			req.Metadata[k] = v
		}
	}
	return req, nil
}

// failoverFlags are the flags of failover test and failover live.
func failoverFlags(fs *flag.FlagSet, o *opts) {
	fs.StringVar(&o.vm, "vm", "", "the stopped VM to fail over to (required)")
	fs.StringVar(&o.root, "root", "", "the volume that becomes the VM's root disk, device 0 (required)")
	fs.Var(&o.data, "data", "a data volume attached after the root, repeatable, in order")
	fs.BoolVar(&o.noStart, "no-start", false, "leave the VM stopped")
	fs.BoolVar(&o.force, "force", false, "move volumes in use on their host (cuts NBD clients; data not yet written is lost)")
}

// failover is failover test (test true) and failover live.
func (in *invocation) failover(ctx context.Context, label string, test bool) error {
	var missing []string
	if in.o.vm == "" {
		missing = append(missing, "--vm")
	}
	if in.o.root == "" {
		missing = append(missing, "--root")
	}
	if len(missing) > 0 {
		return usagef("%s: %s required", label, strings.Join(missing, ", "))
	}
	req := commands.FailoverRequest{VMID: in.o.vm, RootVolumeID: in.o.root, DataVolumeIDs: append([]string{}, in.o.data...),
		Test: test, StartVM: !in.o.noStart, Force: in.o.force}
	return in.operation(ctx, func(ctx context.Context, o ...client.CallOption) (commands.Operation, error) {
		return in.c.Failover(ctx, req, o...)
	})
}

// listOperations is op list; the next page's cursor goes to stderr.
func listOperations(ctx context.Context, in *invocation) error {
	q := client.ListOptions{Type: commands.OpType(in.o.typ), Status: commands.OpStatus(in.o.status),
		VolumeID: in.o.volume, VMID: in.o.vm, RequestedBy: in.o.requestedBy, Limit: in.o.limit, Cursor: in.o.cursor}
	page, err := in.c.ListOperations(ctx, q)
	if err != nil {
		return err
	}
	if err := in.print(page.Operations, operationRows(page.Operations)); err != nil {
		return err
	}
	if page.NextCursor != "" {
		fmt.Fprintf(in.err, "more: --cursor %s\n", page.NextCursor)
	}
	return nil
}

// listVolumes is volume list: every volume CloudStack has that matches
// --tag, --name and --vm, page after page.
func listVolumes(ctx context.Context, in *invocation) ([]commands.VolumeStatus, error) {
	list := []commands.VolumeStatus{}
	for v, err := range in.c.Volumes(ctx, client.VolumeListOptions{Tags: in.o.tags, Name: in.o.name, VMID: in.o.vm}) {
		if err != nil {
			return nil, err
		}
		list = append(list, v)
	}
	return list, nil
}

// metadataFlag collects repeated --metadata k=v.
type metadataFlag map[string]string

func (m *metadataFlag) String() string { return fmt.Sprint(map[string]string(*m)) }

func (m *metadataFlag) Set(v string) error {
	k, val, ok := strings.Cut(v, "=")
	if !ok || k == "" {
		return fmt.Errorf("want k=v, got %q", v)
	}
	if *m == nil {
		*m = metadataFlag{}
	}
	(*m)[k] = val
	return nil
}

// listFlag collects a repeated flag's values in order.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(v string) error {
	*l = append(*l, v)
	return nil
}

// sizeUnits are the units --size takes: binary for K/M/G/T with or
// without "iB", decimal for KB/MB/GB/TB.
var sizeUnits = []struct {
	suffix string
	factor int64
}{
	{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40},
	{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12},
	{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"T", 1 << 40}, {"B", 1},
}

// parseSize reads "5GiB", "5G", "5368709120" or "1.5TiB" as bytes.
func parseSize(s string) (int64, error) {
	num, factor := strings.TrimSpace(s), int64(1)
	for _, u := range sizeUnits {
		if strings.HasSuffix(strings.ToUpper(num), strings.ToUpper(u.suffix)) {
			num, factor = strings.TrimSpace(num[:len(num)-len(u.suffix)]), u.factor
			break
		}
	}
	if n, err := strconv.ParseInt(num, 10, 64); err == nil && n > 0 && n <= (1<<62)/factor {
		return n * factor, nil
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil || f <= 0 || f*float64(factor) > 1<<62 {
		return 0, fmt.Errorf("want a positive size such as 5GiB or 5368709120, got %q", s)
	}
	return int64(f * float64(factor)), nil
}

// defaultNATSCreds is the operator credentials of a volumed run from this
// directory with its default data dir, when they exist ("" otherwise).
func defaultNATSCreds() string {
	const path = "volumed-data/creds/operator.creds"
	if _, err := os.Stat(path); err != nil {
		return ""
	}
	return path
}
