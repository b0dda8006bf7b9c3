package httpbridge_test

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/httpbridge"
	"github.com/volumed/volumed/internal/apitest"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
)

// Fixed ids of the tests.
const (
	vol1       = "3f2b7c1e-8a4d-4e6f-9b0a-1c2d3e4f5a6b"
	vol2       = "7d9e1f20-3b4c-4d5e-8f6a-7b8c9d0e1f2a"
	volUnknown = "00000000-0000-4000-8000-000000000000"
	// volPanic makes the test backend panic.
	volPanic = "deadbeef-dead-4eef-8eef-deadbeefdead"
	vm1      = "87654321-4321-4321-4321-210987654321"
	snap1    = "5a5a5a5a-1b1b-4c2c-8d3d-4e4e4e4e4e4e"
	vmEmpty  = "11111111-2222-4333-8444-555555555555"
)

// harness is a bridge served on a free loopback port, with a real embedded
// NATS, a real KV store and a test command service.
type harness struct {
	bus      *nats.Conn
	store    state.Store
	backend  *testBackend
	commands *testCommands
	srv      *httpbridge.Server
	base     string
	v        *apitest.Validator
	// client sends the requests; nil is http.DefaultClient.
	client *http.Client
}

// options of newHarness.
type options struct {
	store   state.Store // default: KV on the harness bus
	maxWait time.Duration
	conn    *nats.Conn // the bridge's connection; default the bus's
	listen  string     // default 127.0.0.1:0
	token   string
	tokens  *httpbridge.Tokens
	// tls serves HTTPS with a certificate of a CA of the test's own.
	tls bool
	// HTTP server timeouts; default the bridge's.
	readHeaderTimeout, readTimeout, idleTimeout time.Duration
	// maxConns caps the connections served at once; default the bridge's.
	maxConns int
	// queryTimeout bounds a read; default the bridge's.
	queryTimeout time.Duration
}

func newHarness(t testing.TB, o options) *harness {
	t.Helper()
	return newHarnessOnBus(t, testenv.StartBus(t), o)
}

// newHarnessOnBus is newHarness on a running bus.
func newHarnessOnBus(t testing.TB, b *bus.Bus, o options) *harness {
	t.Helper()
	ctx := context.Background()
	h := &harness{bus: b.Conn(), backend: newTestBackend(), v: validator, store: o.store}
	if h.store == nil {
		kv, err := state.NewKV(ctx, b.JetStream(), state.KVConfig{Logger: testLogger(t)})
		if err != nil {
			t.Fatalf("kv store: %v", err)
		}
		t.Cleanup(func() { _ = kv.Close(context.Background()) })
		h.store = kv
	}
	h.commands = &testCommands{store: h.store}
	conn := o.conn
	if conn == nil {
		conn = b.Conn()
	}
	if o.listen == "" {
		o.listen = "127.0.0.1:0"
	}
	var serverTLS *tls.Config
	scheme := "http"
	if o.tls {
		trust := testTrust(t)
		serverTLS, scheme = trust.Server(), "https"
		h.client = &http.Client{Transport: &http.Transport{TLSClientConfig: trust.Client(), ForceAttemptHTTP2: true}}
	}
	h.srv = httpbridge.New(httpbridge.Config{Listen: o.listen, Conn: conn, Commands: h.commands, Store: h.store,
		Backend: h.backend, VMID: vm1, MaxWait: o.maxWait, TLS: serverTLS, Tokens: o.tokens,
		Token: o.token, ReadHeaderTimeout: o.readHeaderTimeout, ReadTimeout: o.readTimeout, IdleTimeout: o.idleTimeout,
		MaxConns: o.maxConns, QueryTimeout: o.queryTimeout, Logger: testLogger(t)})
	if err := h.srv.Start(ctx); err != nil {
		t.Fatalf("start bridge: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := h.srv.Close(ctx); err != nil {
			t.Errorf("close bridge: %v", err)
		}
	})
	_, port, _ := net.SplitHostPort(h.srv.Addr())
	h.base = scheme + "://127.0.0.1:" + port + httpbridge.BasePath
	return h
}

// baseConfig is a complete bridge configuration on loopback, on a bus and
// a KV store of its own, for tests that start a bridge themselves.
func baseConfig(t testing.TB) httpbridge.Config {
	t.Helper()
	b := testenv.StartBus(t)
	kv, err := state.NewKV(context.Background(), b.JetStream(), state.KVConfig{Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("kv store: %v", err)
	}
	t.Cleanup(func() { _ = kv.Close(context.Background()) })
	return httpbridge.Config{Listen: "127.0.0.1:0", Conn: b.Conn(), Commands: &testCommands{store: kv}, Store: kv,
		Backend: newTestBackend(), Logger: testLogger(t)}
}

// do sends one request, validated against the OpenAPI document.
func (h *harness) do(t testing.TB, method, path, body string) (*http.Response, []byte) {
	t.Helper()
	return h.v.Do(t, h.client, apitest.NewRequest(t, method, h.base+path, body))
}

// seedOperation records an operation created at the given offset from a
// fixed time, so list order is known.
func (h *harness) seedOperation(t testing.TB, id string, typ commands.OpType, status commands.OpStatus, volumeID, vmID string, minute int) commands.Operation {
	t.Helper()
	created := time.Date(2025, 8, 19, 20, minute, 0, 0, time.UTC)
	op := commands.Operation{ID: id, Type: typ, Status: status, VolumeID: volumeID,
		Request: json.RawMessage(fmt.Sprintf(`{"volume_id":%q}`, volumeID)), CreatedAt: created, UpdatedAt: created}
	if vmID != "" {
		op.VMID = &vmID
	}
	if status.Terminal() {
		done := created.Add(16 * time.Second)
		op.CompletedAt = &done
		op.Response = &commands.OpResponse{VolumeID: volumeID, Message: "done"}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	op, err := h.store.CreateOperation(ctx, op)
	if err != nil {
		t.Fatalf("seed operation %s: %v", id, err)
	}
	return op
}

// seedMapping records the mapping of volumeID to devicePath on vm1.
func (h *harness) seedMapping(t *testing.T, volumeID, devicePath string) {
	t.Helper()
	now := time.Date(2025, 8, 19, 20, 31, 16, 0, time.UTC)
	dev := int64(2)
	m := commands.Mapping{ID: "mapping-" + volumeID[:8], VolumeID: volumeID, VMID: vm1, DevicePath: devicePath,
		CloudStackState: commands.CloudStackAttached, LinuxState: commands.LinuxDetected, Size: 5368717312,
		DeviceID: &dev, LastSync: now, CreatedAt: now, UpdatedAt: now}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := h.store.PutMapping(ctx, m); err != nil {
		t.Fatalf("seed mapping %s: %v", volumeID, err)
	}
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
}

func readTestdata(t testing.TB, name string) string {
	t.Helper()
	if name == "" {
		return ""
	}
	data, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

// testCommands is the Commands of the tests: it validates with the
// commands package, records a pending operation in the store and answers
// the operation (201) or the error, as volumed's command service does.
// Volumes other than vol1 and vol2 are unknown to it (404). With fixed
// set, it answers that to every command instead, and sends the command's
// Idempotency-Key on keys.
type testCommands struct {
	store state.Store
	mu    sync.Mutex
	// requesters are the requested_by of the commands, in order.
	requesters []string
	// sent are the commands' subjects and bodies, in order.
	sent  []sentCommand
	fixed *commands.Answer
	keys  chan string
}

var _ httpbridge.Commands = (*testCommands)(nil)

// sentCommand is a command as the bridge sent it.
type sentCommand struct {
	subject string
	body    string
}

// sentAll are the commands sent so far.
func (c *testCommands) sentAll() []sentCommand {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.sent)
}

// last is the last command sent.
func (c *testCommands) last() sentCommand {
	if s := c.sentAll(); len(s) > 0 {
		return s[len(s)-1]
	}
	return sentCommand{}
}

// answerAll makes c answer a to every command, sending the keys on keys.
func (c *testCommands) answerAll(a commands.Answer, keys chan string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.fixed, c.keys = &a, keys
}

func (c *testCommands) Command(ctx context.Context, subject string, data []byte, key string) commands.Answer {
	c.mu.Lock()
	fixed, keys := c.fixed, c.keys
	c.requesters = append(c.requesters, commands.Requester(ctx))
	c.sent = append(c.sent, sentCommand{subject: subject, body: string(data)})
	c.mu.Unlock()
	if fixed != nil {
		keys <- key
		return *fixed
	}
	status := http.StatusCreated
	if subject == commands.SubjectForceSync {
		status = http.StatusOK
	}
	fn, ok := testCommandHandlers(c.store)[subject]
	if !ok {
		panic("test command service: no subject " + subject)
	}
	result, err := fn(ctx, data)
	a := commands.Answer{Status: status}
	if err != nil {
		a.Err = commands.AsError(err)
		a.Status, result = a.Err.Status, a.Err
	}
	a.Body, _ = json.Marshal(result)
	return a
}

// testCommandHandlers are the test command service's commands.
func testCommandHandlers(store state.Store) map[string]func(ctx context.Context, data []byte) (any, error) {
	known := map[string]bool{vol1: true, vol2: true}
	accept := func(ctx context.Context, typ commands.OpType, volumeID string, vmID *string, req any) (any, error) {
		if typ != commands.OpCreate && !known[volumeID] {
			return nil, commands.NotFound("volume %s not found in CloudStack", volumeID).WithDetail("volume_id", volumeID)
		}
		raw, _ := json.Marshal(req)
		now := time.Now().UTC()
		op := commands.Operation{ID: "op-" + uuid.NewString(), Type: typ, Status: commands.StatusPending,
			VolumeID: volumeID, VMID: vmID, Request: raw, CreatedAt: now, UpdatedAt: now}
		op, err := store.CreateOperation(ctx, op)
		if err != nil {
			if errors.Is(err, state.ErrUnavailable) {
				return nil, commands.Unavailable("state store unavailable: %v", err)
			}
			return nil, commands.Internal("state store: %v", err)
		}
		return op, nil
	}
	return map[string]func(ctx context.Context, data []byte) (any, error){
		commands.SubjectCreate: func(ctx context.Context, data []byte) (any, error) {
			req, err := commands.DecodeCreate(data)
			if err != nil {
				return nil, err
			}
			return accept(ctx, commands.OpCreate, "", nil, req)
		},
		commands.SubjectAttach:     attachHandler(accept, false),
		commands.SubjectAttachRoot: attachHandler(accept, true),
		commands.SubjectDetach:     volumeHandler(accept, commands.OpDetach),
		commands.SubjectDelete:     volumeHandler(accept, commands.OpDelete),
		commands.SubjectExport: func(ctx context.Context, data []byte) (any, error) {
			req, err := commands.DecodeExport(data)
			if err != nil {
				return nil, err
			}
			if req.VolumeID == vol2 { // known, but attached nowhere
				return nil, commands.Conflict("volume %s is not attached to this host", vol2)
			}
			vm := vm1
			return accept(ctx, commands.OpExport, req.VolumeID, &vm, req)
		},
		commands.SubjectUnexport: volumeHandler(accept, commands.OpUnexport),
		commands.SubjectSnapshot: decoded(accept, commands.OpSnapshot, commands.DecodeSnapshot,
			func(r commands.SnapshotRequest) string { return r.VolumeID }),
		commands.SubjectRevert: decoded(accept, commands.OpRevert, commands.DecodeRevert,
			func(r commands.RevertRequest) string { return r.VolumeID }),
		commands.SubjectResize: decoded(accept, commands.OpResize, commands.DecodeResize,
			func(r commands.ResizeRequest) string { return r.VolumeID }),
		commands.SubjectTags: decoded(accept, commands.OpTags, commands.DecodeTags,
			func(r commands.TagsRequest) string { return r.VolumeID }),
		commands.SubjectDeleteSnapshot: func(ctx context.Context, data []byte) (any, error) {
			req, err := commands.DecodeSnapshotID(data)
			if err != nil {
				return nil, err
			}
			if req.SnapshotID != snap1 {
				return nil, commands.NotFound("snapshot %s not found in CloudStack", req.SnapshotID)
			}
			return accept(ctx, commands.OpDeleteSnapshot, vol1, nil, req)
		},
		commands.SubjectFailover: func(ctx context.Context, data []byte) (any, error) {
			req, err := commands.DecodeFailover(data)
			if err != nil {
				return nil, err
			}
			for _, v := range req.Volumes() {
				if !known[v] {
					return nil, commands.NotFound("volume %s not found in CloudStack", v).WithDetail("volume_id", v)
				}
			}
			vm := req.VMID
			return accept(ctx, commands.OpFailover, req.RootVolumeID, &vm, req)
		},
		commands.SubjectRollback: func(ctx context.Context, data []byte) (any, error) {
			req, err := commands.DecodeRollback(data)
			if err != nil {
				return nil, err
			}
			f, err := store.GetOperation(ctx, req.FailoverID)
			if err != nil || f.Type != commands.OpFailover {
				return nil, commands.NotFound("failover %s not found", req.FailoverID)
			}
			return accept(ctx, commands.OpRollback, f.VolumeID, f.VMID, req)
		},
		commands.SubjectForceSync: func(context.Context, []byte) (any, error) {
			return commands.SyncResult{Message: "Force sync completed successfully", Timestamp: time.Now().UTC(),
				Changes: []string{}}, nil
		},
	}
}

// decoded is the handler of a command whose request decode validates and
// volume names the volume of.
func decoded[R any](accept acceptFunc, typ commands.OpType, decode func([]byte) (R, error), volume func(R) string) func(context.Context, []byte) (any, error) {
	return func(ctx context.Context, data []byte) (any, error) {
		req, err := decode(data)
		if err != nil {
			return nil, err
		}
		return accept(ctx, typ, volume(req), nil, req)
	}
}

type acceptFunc func(ctx context.Context, typ commands.OpType, volumeID string, vmID *string, req any) (any, error)

func attachHandler(accept acceptFunc, root bool) func(context.Context, []byte) (any, error) {
	return func(ctx context.Context, data []byte) (any, error) {
		req, err := commands.DecodeAttach(data, root)
		if err != nil {
			return nil, err
		}
		vm := req.VMID
		return accept(ctx, commands.OpAttach, req.VolumeID, &vm, req)
	}
}

func volumeHandler(accept acceptFunc, typ commands.OpType) func(context.Context, []byte) (any, error) {
	return func(ctx context.Context, data []byte) (any, error) {
		req, err := commands.DecodeVolume(data)
		if err != nil {
			return nil, err
		}
		return accept(ctx, typ, req.VolumeID, nil, req)
	}
}

// testBackend is the Backend of the tests: volume views and exports held
// in memory.
type testBackend struct {
	mu         sync.Mutex
	volumes    map[string]commands.VolumeStatus
	exports    []commands.Export
	exportsErr error
	health     commands.Health
	metricsErr error
	// startCheck answers AwaitStartCheck; nil: never waits.
	startCheck func(ctx context.Context, vmID string) (bool, error)
}

var _ httpbridge.Backend = (*testBackend)(nil)

func newTestBackend() *testBackend {
	vm, dev := vm1, "/dev/vdb"
	devID := int64(2)
	return &testBackend{
		volumes: map[string]commands.VolumeStatus{
			vol1: {VolumeID: vol1, VMID: &vm, DevicePath: &dev, State: "Ready", Size: 5368709120,
				CloudStackData: &commands.CloudStackData{ID: vol1, Name: "migration-volume-001", State: "Ready",
					Type: "DATADISK", ZoneName: "OSSEA-Zone", VirtualMachineID: vm1, DeviceID: &devID, Size: 5368709120},
				Tags:          map[string]string{},
				LinuxData:     &commands.LinuxData{DevicePath: dev, Size: 5368717312, Controller: "virtio4"},
				LastOperation: &commands.LastOperation{ID: "op-b2c3d4e5-f6a7-4901-bcde-f12345678901", Type: commands.OpAttach, Status: commands.StatusCompleted}},
			vol2: {VolumeID: vol2, State: "Allocated", Size: 10737418240, Tags: map[string]string{"env": "test"}},
		},
		health: commands.Health{Status: commands.Healthy, Timestamp: time.Now().UTC(),
			CloudStackHealth: commands.Healthy, DatabaseHealth: commands.Healthy, DeviceMonitor: commands.NotConfigured,
			Details: commands.HealthDetails{Store: "embedded", UptimeSeconds: 3}},
	}
}

func (b *testBackend) VolumeStatus(_ context.Context, volumeID string) (commands.VolumeStatus, error) {
	if volumeID == volPanic {
		panic("test backend: volume status exploded")
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	v, ok := b.volumes[volumeID]
	if !ok {
		return v, commands.NotFound("volume %s not found in CloudStack", volumeID).WithDetail("volume_id", volumeID)
	}
	return v, nil
}

func (b *testBackend) VMVolumes(_ context.Context, vmID string) ([]commands.VolumeStatus, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []commands.VolumeStatus
	for _, id := range []string{vol1, vol2} {
		if v := b.volumes[id]; v.VMID != nil && *v.VMID == vmID {
			v.CloudStackData, v.LinuxData = nil, nil
			out = append(out, v)
		}
	}
	return out, nil // nil when none: the bridge must answer []
}

func (b *testBackend) Volumes(_ context.Context, f commands.VolumeFilter) ([]commands.VolumeStatus, string, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []commands.VolumeStatus
	for _, id := range []string{vol1, vol2} {
		v := b.volumes[id]
		match := id > f.Cursor
		for k, want := range f.Tags {
			match = match && v.Tags[k] == want
		}
		if match {
			out = append(out, v)
		}
	}
	next := ""
	if len(out) > f.Limit {
		out = out[:f.Limit]
		next = out[len(out)-1].VolumeID
	}
	return out, next, nil
}

func (b *testBackend) VolumeSnapshots(_ context.Context, volumeID string) ([]commands.Snapshot, error) {
	if volumeID != vol1 && volumeID != vol2 {
		return nil, commands.NotFound("volume %s not found in CloudStack", volumeID)
	}
	if volumeID == vol2 {
		return nil, nil // none: the bridge must answer []
	}
	s, _ := b.Snapshot(context.Background(), snap1)
	return []commands.Snapshot{s}, nil
}

func (b *testBackend) Snapshot(_ context.Context, snapshotID string) (commands.Snapshot, error) {
	if snapshotID != snap1 {
		return commands.Snapshot{}, commands.NotFound("snapshot %s not found in CloudStack", snapshotID)
	}
	at := time.Date(2026, 12, 7, 0, 0, 0, 0, time.UTC)
	return commands.Snapshot{ID: snap1, VolumeID: vol1, Name: "before-test", State: "BackedUp", Size: 5368709120, CreatedAt: &at}, nil
}

func (b *testBackend) Health(context.Context) commands.Health {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.health
}

func (b *testBackend) setHealth(status string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.health.Status = status
}

func (b *testBackend) Metrics(context.Context) (commands.Metrics, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.metricsErr != nil {
		return commands.Metrics{}, b.metricsErr
	}
	// Maps left nil: the bridge answers them as {}.
	return commands.Metrics{Timestamp: time.Now().UTC(), TotalOperations: 3, AverageResponseTimeMs: 2340.5,
		Details: commands.MetricsDetails{UptimeSeconds: 3}}, nil
}

func (b *testBackend) Exports(context.Context) ([]commands.Export, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.exports, b.exportsErr // nil when none: the bridge must answer []
}

func (b *testBackend) Export(_ context.Context, volumeID string) (commands.Export, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.exportsErr != nil {
		return commands.Export{}, b.exportsErr
	}
	for _, e := range b.exports {
		if e.VolumeID == volumeID {
			return e, nil
		}
	}
	return commands.Export{}, commands.NotFound("volume %s is not exported on this host", volumeID)
}

// setExports replaces the exports and the error the reads answer.
func (b *testBackend) setExports(exports []commands.Export, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.exports, b.exportsErr = exports, err
}

func (b *testBackend) setMetricsErr(err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.metricsErr = err
}

func (b *testBackend) AwaitStartCheck(ctx context.Context, vmID string) (bool, error) {
	b.mu.Lock()
	check := b.startCheck
	b.mu.Unlock()
	if check == nil {
		return false, nil
	}
	return check(ctx, vmID)
}

// setStartCheck sets what AwaitStartCheck answers.
func (b *testBackend) setStartCheck(check func(ctx context.Context, vmID string) (bool, error)) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.startCheck = check
}
