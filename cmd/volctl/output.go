package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/volumed/volumed/client"
	"github.com/volumed/volumed/commands"
)

// progressSlice is how long one ?wait request holds while --wait shows
// progress without NATS; each answer shows the operation's current step.
const progressSlice = time.Second

// table is rows of cells; the first row is the header.
type table [][]string

// print writes v as indented JSON with -o json, else t as aligned columns.
func (in *invocation) print(v any, t table) error {
	if in.g.output == "json" {
		enc := json.NewEncoder(in.out)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	tw := tabwriter.NewWriter(in.out, 0, 4, 2, ' ', 0)
	for _, row := range t {
		fmt.Fprintln(tw, strings.Join(row, "\t"))
	}
	return tw.Flush()
}

// operation runs a command that starts an operation, with
// --idempotency-key's key if given: without --wait it prints the accepted
// operation; with it, waits (showing progress) and
// prints the final one.
func (in *invocation) operation(ctx context.Context, start func(ctx context.Context, o ...client.CallOption) (commands.Operation, error)) error {
	ctx, cancel := in.deadline(ctx)
	defer cancel()
	var opts []client.CallOption
	if in.g.idempotencyKey != "" {
		opts = append(opts, client.WithIdempotencyKey(in.g.idempotencyKey))
	}
	op, err := start(ctx, opts...)
	if err != nil {
		return err
	}
	if !in.g.wait {
		return in.print(op, operationFields(op))
	}
	return in.waitAndPrint(ctx, op.ID)
}

// deadline applies --timeout.
func (in *invocation) deadline(ctx context.Context) (context.Context, context.CancelFunc) {
	if in.g.timeout > 0 {
		return context.WithTimeout(ctx, in.g.timeout)
	}
	return context.WithCancel(ctx)
}

// waitAndPrint follows an operation to its end with progress on stderr,
// prints it, and fails unless it completed.
func (in *invocation) waitAndPrint(ctx context.Context, opID string) error {
	ctx, cancel := in.deadline(ctx)
	defer cancel()
	p := newProgress(in.err)
	var op commands.Operation
	var err error
	if in.nc != nil {
		op, err = in.followEvents(ctx, opID, p.show)
	} else {
		op, err = in.c.WaitProgress(ctx, opID, progressSlice, p.show)
	}
	p.end()
	if err != nil {
		return err
	}
	if err := in.print(op, operationFields(op)); err != nil {
		return err
	}
	if op.Status != commands.StatusCompleted {
		msg := fmt.Sprintf("operation %s %s", op.ID, op.Status)
		if op.Error != "" {
			msg += ": " + op.Error
		}
		fmt.Fprintln(in.err, "volctl:", msg)
		if len(op.Details) > 0 {
			fmt.Fprintf(in.err, "details: %s\n", compactJSON(op.Details))
		}
		if advice := workflowAdvice(op); advice != "" {
			fmt.Fprintln(in.err, "volctl:", advice)
		}
		return &failedError{msg: msg, shown: true}
	}
	return nil
}

// followEvents follows an operation's NATS events to its terminal one and
// returns the stored record then.
func (in *invocation) followEvents(ctx context.Context, opID string, show func(commands.Operation)) (commands.Operation, error) {
	for ev, err := range in.c.Watch(ctx, opID) {
		if err != nil {
			return ev, err
		}
		show(ev)
	}
	return in.c.GetOperation(ctx, opID)
}

// watch is op watch: a line per event (or, without NATS, per change seen
// by polling) until the operation ends.
func (in *invocation) watch(ctx context.Context, opID string) error {
	ctx, cancel := in.deadline(ctx)
	defer cancel()
	printEvent := func(op commands.Operation) {
		if in.g.output == "json" {
			data, _ := json.Marshal(op)
			fmt.Fprintln(in.out, string(data))
			return
		}
		fmt.Fprintln(in.out, progressLine(op))
	}
	var op commands.Operation
	var err error
	if in.nc != nil {
		for ev, werr := range in.c.Watch(ctx, opID) {
			if werr != nil {
				return werr
			}
			printEvent(ev)
			op = ev
		}
	} else {
		last := ""
		op, err = in.c.WaitProgress(ctx, opID, progressSlice, func(o commands.Operation) {
			if line := progressLine(o); line != last {
				printEvent(o)
				last = line
			}
		})
		if err != nil {
			return err
		}
	}
	if op.Status != commands.StatusCompleted {
		return &failedError{msg: fmt.Sprintf("operation %s %s", op.ID, op.Status)}
	}
	return nil
}

// progressLine describes where an operation is.
func progressLine(op commands.Operation) string {
	parts := []string{op.ID, string(op.Type), string(op.Status)}
	if w := workflowProgress(op); w != "" {
		parts = append(parts, w)
	} else if op.Step != "" {
		parts = append(parts, op.Step)
	}
	if op.Error != "" {
		parts = append(parts, "error: "+op.Error)
	}
	return strings.Join(parts, " ")
}

// progress shows an operation's steps: one line rewritten in place on a
// terminal, a line per change otherwise.
type progress struct {
	w     io.Writer
	tty   bool
	start time.Time
	last  string
	drawn bool
}

func newProgress(w io.Writer) *progress {
	return &progress{w: w, tty: isTerminal(w), start: time.Now()}
}

// show draws op if it changed (on a terminal, also to move the clock).
func (p *progress) show(op commands.Operation) {
	line := progressLine(op)
	if p.tty {
		fmt.Fprintf(p.w, "\r\033[K%s (%s)", line, time.Since(p.start).Round(100*time.Millisecond))
		p.drawn = true
		return
	}
	if line != p.last {
		fmt.Fprintln(p.w, line)
	}
	p.last = line
}

// end finishes the live line.
func (p *progress) end() {
	if p.tty && p.drawn {
		fmt.Fprintln(p.w)
	}
}

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// compactJSON is v as one line of JSON.
func compactJSON(v any) string {
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprint(v)
	}
	return string(data)
}

// orDash shows "" as "-".
func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// ptr shows a nullable string.
func ptr(s *string) string {
	if s == nil {
		return "-"
	}
	return orDash(*s)
}

// ts shows a time in UTC, "-" when zero or nil.
func ts(t *time.Time) string {
	if t == nil || t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

func operationFields(op commands.Operation) table {
	t := table{{"FIELD", "VALUE"},
		{"id", op.ID}, {"type", string(op.Type)}, {"status", string(op.Status)},
		{"volume_id", orDash(op.VolumeID)}, {"vm_id", ptr(op.VMID)}, {"requested_by", orDash(op.RequestedBy)}, {"step", orDash(op.Step)},
		{"created_at", ts(&op.CreatedAt)}, {"completed_at", ts(op.CompletedAt)}}
	if op.Response != nil {
		t = append(t, []string{"device_path", orDash(op.Response.DevicePath)}, []string{"message", orDash(op.Response.Message)})
		if op.Response.ExportName != "" {
			t = append(t, []string{"export_name", op.Response.ExportName})
		}
	}
	t = append(t, workflowRows(op)...)
	if op.Error != "" {
		t = append(t, []string{"error", op.Error})
	}
	if len(op.Details) > 0 {
		t = append(t, []string{"details", compactJSON(op.Details)})
	}
	return t
}

// isWorkflow reports whether op is a failover or a rollback.
func isWorkflow(op commands.Operation) bool {
	return op.Type == commands.OpFailover || op.Type == commands.OpRollback
}

// workflowProgress describes the step a failover or rollback runs:
// "[done/total] name volume vm VM (status)", from its details and
// workflow; "" for another operation or before its first step.
func workflowProgress(op commands.Operation) string {
	if !isWorkflow(op) {
		return ""
	}
	var parts []string
	done, okDone := intDetail(op.Details, commands.DetailStepsDone)
	total, okTotal := intDetail(op.Details, commands.DetailStepsTotal)
	if okDone && okTotal {
		parts = append(parts, fmt.Sprintf("[%d/%d]", done, total))
	}
	step := op.Step
	if s, ok := op.Details[commands.DetailStep].(string); ok && s != "" {
		step = s
	}
	if i, ok := stepIndex(step); ok && op.Workflow != nil && i < len(op.Workflow.Steps) {
		parts = append(parts, stepText(op.Workflow.Steps[i]))
	} else if step != "" {
		parts = append(parts, step)
	}
	return strings.Join(parts, " ")
}

// stepIndex reads the index of a workflow's step, "<index>:<name>:<volume>".
func stepIndex(step string) (int, bool) {
	idx, _, ok := strings.Cut(step, ":")
	if !ok {
		return 0, false
	}
	i, err := strconv.Atoi(idx)
	return i, err == nil && i >= 0
}

// stepText describes one workflow step: "undo: " for a compensating one,
// its name, volume and VM, and its status.
func stepText(s commands.WorkflowStep) string {
	text := s.Name
	if s.Undoes != nil {
		text = fmt.Sprintf("undo #%d: %s", *s.Undoes, text)
	}
	if s.VolumeID != "" {
		text += " " + s.VolumeID
	}
	if s.VMID != "" {
		text += " vm " + s.VMID
	}
	return text + " (" + orDash(s.Status) + ")"
}

// intDetail reads an integer of an operation's details (a JSON number).
func intDetail(d map[string]any, key string) (int, bool) {
	switch v := d[key].(type) {
	case float64:
		return int(v), true
	case int:
		return v, true
	}
	return 0, false
}

// workflowRows are a failover's or rollback's steps, snapshots and
// previous places, and, when it failed, whether it was compensated and
// what is left where.
func workflowRows(op commands.Operation) table {
	if !isWorkflow(op) {
		return nil
	}
	var t table
	var steps []commands.WorkflowStep
	snapshots, before := map[string]string{}, map[string]commands.Placement{}
	if op.Workflow != nil {
		steps, snapshots, before = op.Workflow.Steps, op.Workflow.Snapshots, op.Workflow.Before
	}
	if r := op.Response; r != nil {
		if len(r.Steps) > 0 {
			steps = r.Steps
		}
		if len(r.Snapshots) > 0 {
			snapshots = r.Snapshots
		}
		if len(r.Before) > 0 {
			before = r.Before
		}
	}
	for i, s := range steps {
		t = append(t, []string{fmt.Sprintf("step %d", i), stepText(s) + " " + orDash(s.OperationID)})
	}
	for _, vol := range slices.Sorted(maps.Keys(snapshots)) {
		t = append(t, []string{"snapshot " + vol, snapshots[vol]})
	}
	for _, vol := range slices.Sorted(maps.Keys(before)) {
		t = append(t, []string{"before " + vol, placementText(before[vol])})
	}
	if c, ok := op.Details[commands.DetailCompensated].(bool); ok {
		t = append(t, []string{"compensated", strconv.FormatBool(c)})
	}
	if left, ok := op.Details[commands.DetailLeft].([]any); ok {
		for _, l := range left {
			if s, ok := l.(string); ok {
				t = append(t, []string{"left", s})
				continue
			}
			t = append(t, []string{"left", compactJSON(l)})
		}
	}
	return t
}

// placementText says where a volume was before a failover.
func placementText(p commands.Placement) string {
	if p.VMID == "" && p.ExportName == "" {
		return "detached"
	}
	var parts []string
	if p.VMID != "" {
		parts = append(parts, "vm "+p.VMID)
	}
	if p.DeviceID != nil {
		parts = append(parts, fmt.Sprintf("device %d", *p.DeviceID))
	}
	if p.ExportName != "" {
		mode := "read-write"
		if p.ExportReadOnly {
			mode = "read-only"
		}
		parts = append(parts, fmt.Sprintf("export %s (%s) on %s", p.ExportName, mode, orDash(p.ExportVMID)))
	}
	return strings.Join(parts, ", ")
}

// workflowAdvice says what a failed failover or rollback left to do.
func workflowAdvice(op commands.Operation) string {
	if !isWorkflow(op) || op.Status != commands.StatusFailed {
		return ""
	}
	c, ok := op.Details[commands.DetailCompensated].(bool)
	switch {
	case !ok:
		return ""
	case c:
		return "every step it did was undone: the volumes are where they were and its snapshots are deleted"
	case op.Type == commands.OpRollback:
		return "the rollback stopped part way (see left); ask for it again: volctl failover rollback " + rollbackTarget(op) + " --wait"
	default:
		return "the undo could not finish: the rows 'left' say what is where; put those back by hand (see docs/failover.md)"
	}
}

// rollbackTarget is the failover a rollback names, from its request.
func rollbackTarget(op commands.Operation) string {
	var req commands.RollbackRequest
	if json.Unmarshal(op.Request, &req) != nil || req.FailoverID == "" {
		return "<failover>"
	}
	return req.FailoverID
}

func operationRows(ops []commands.OperationSummary) table {
	t := table{{"ID", "TYPE", "STATUS", "VOLUME", "VM", "CREATED", "ERROR"}}
	for _, op := range ops {
		t = append(t, []string{op.ID, string(op.Type), string(op.Status), orDash(op.VolumeID), ptr(op.VMID),
			ts(&op.CreatedAt), orDash(commands.Shown(op.Error, 60))})
	}
	return t
}

func volumeRows(list []commands.VolumeStatus) table {
	t := table{{"VOLUME", "NAME", "STATE", "SIZE", "VM", "DEVICE", "LAST OPERATION"}}
	for _, v := range list {
		name, last := "-", "-"
		if v.CloudStackData != nil {
			name = orDash(v.CloudStackData.Name)
		}
		if v.LastOperation != nil {
			last = string(v.LastOperation.Type) + " " + string(v.LastOperation.Status)
		}
		t = append(t, []string{v.VolumeID, name, orDash(v.State), fmt.Sprintf("%dGiB", v.Size>>30), ptr(v.VMID), ptr(v.DevicePath), last})
	}
	return t
}

func snapshotRows(list []commands.Snapshot) table {
	t := table{{"SNAPSHOT", "VOLUME", "NAME", "STATE", "SIZE", "CREATED"}}
	for _, s := range list {
		t = append(t, []string{s.ID, s.VolumeID, s.Name, s.State, fmt.Sprintf("%dGiB", s.Size>>30), ts(s.CreatedAt)})
	}
	return t
}

func mappingFields(m commands.Mapping) table {
	return table{{"FIELD", "VALUE"}, {"volume_id", m.VolumeID}, {"vm_id", m.VMID}, {"device_path", orDash(m.DevicePath)},
		{"cloudstack_state", m.CloudStackState}, {"linux_state", m.LinuxState}, {"size", fmt.Sprint(m.Size)},
		{"persistent_device_name", orDash(m.PersistentDeviceName)}, {"symlink_path", orDash(m.SymlinkPath)},
		{"last_sync", ts(&m.LastSync)}}
}

func exportRows(list []commands.Export) table {
	t := table{{"VOLUME", "EXPORT", "DEVICE", "READ-ONLY", "STATUS", "CLIENTS"}}
	for _, e := range list {
		t = append(t, []string{e.VolumeID, e.ExportName, e.DevicePath, fmt.Sprint(e.ReadOnly), e.Status, fmt.Sprint(e.Clients)})
	}
	return t
}

func syncRows(r commands.SyncResult) table {
	t := table{{"RESULT", "DETAIL"}, {"message", r.Message}, {"timestamp", ts(&r.Timestamp)}}
	for _, c := range r.Changes {
		t = append(t, []string{"change", c})
	}
	for _, e := range r.Errors {
		t = append(t, []string{"error", e})
	}
	return t
}

func healthRows(h commands.Health) table {
	t := table{{"COMPONENT", "HEALTH"}, {"status", h.Status}, {"cloudstack", h.CloudStackHealth},
		{"database", h.DatabaseHealth}, {"device_monitor", h.DeviceMonitor},
		{"store", h.Details.Store}, {"active_operations", fmt.Sprint(h.Details.ActiveOperations)}}
	for _, k := range slices.Sorted(maps.Keys(h.Details.Errors)) {
		t = append(t, []string{"error " + k, h.Details.Errors[k]})
	}
	return t
}
