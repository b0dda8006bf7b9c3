// Package correlate finds the block device of a volume just attached to a
// VM that runs a device agent (package devagent): it follows the agents'
// device events on devices.<vm_id>.<action>, matches a device to a volume
// by its kernel identity (or, on a VM whose disks show none, by size and
// time), re-checks the device right before handing it over, keeps the
// agents' persistent names, heals mappings whose device came late, and
// repairs drift between mappings and devices.
package correlate

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/devagent"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/internal/follow"
	"github.com/volumed/volumed/internal/lifecycle"
	"github.com/volumed/volumed/state"
)

// Defaults of Config.
const (
	DefaultTimeout        = 60 * time.Second
	DefaultReleaseTimeout = 30 * time.Second
	DefaultReplay         = 10 * time.Minute
)

const (
	// agentProbeTimeout bounds the list request of HasAgent.
	agentProbeTimeout = 500 * time.Millisecond
	// agentTTL is how long a positive answer of an agent is trusted.
	agentTTL = 10 * time.Second
	// requestTimeout bounds a list or names request to an agent.
	requestTimeout = 5 * time.Second
	// resyncRetry is the first pause before a VM whose start check did not
	// end is tried again.
	resyncRetry = 5 * time.Second
	// pollInterval is how often a wait re-lists the VM's devices, should
	// an event be lost.
	pollInterval = time.Second
	// maxStale is how often a write that found its record changed reads
	// it again and decides anew.
	maxStale = 3
	// maxGone bounds a VM's set of removed disk identities.
	maxGone = 4096
	// sizeSlack is how much larger than the volume a device may be and
	// still match by size (virtual disks round up).
	sizeSlack = 1 << 20
)

// Errors of the correlator, wrapped with details.
var (
	// ErrTimeout: no device of the volume appeared in time.
	ErrTimeout = errors.New("no block device appeared for the volume")
	// ErrAgent: the VM's device agent did not answer or refused.
	ErrAgent = errors.New("device agent request failed")
	// ErrName: the persistent name could not be made.
	ErrName = errors.New("persistent name not made")
)

// Health values of Status.
const (
	HealthHealthy  = commands.Healthy
	HealthDegraded = commands.Degraded
	// HealthUnknown: no local agent to report on.
	HealthUnknown = commands.NotConfigured
)

// Config configures a Correlator.
type Config struct {
	// Conn carries the device events and the requests to device agents;
	// required.
	Conn *nats.Conn
	// JetStream reads the device events from stream VOLUMED_DEVICES; nil
	// makes one on Conn.
	JetStream jetstream.JetStream
	// Store holds the mappings recorded and repaired; required.
	Store state.Store
	// Timeout bounds the wait for a device in Attached; default
	// DefaultTimeout.
	Timeout time.Duration
	// ReleaseTimeout bounds the wait for a device to go in Detached;
	// default DefaultReleaseTimeout.
	ReleaseTimeout time.Duration
	// Replay is how far back Start reads the device events, so that the
	// arrivals a correlation resumed after a restart relies on are known
	// again; default DefaultReplay.
	Replay time.Duration
	// LocalVMID is the VM this process runs on: its agents' devices are
	// checked here (devagent.CheckLocal) before one is handed out.
	LocalVMID string
	// LocalStatus reports the health of the agent running in this process;
	// nil when there is none.
	LocalStatus func() devagent.Status
	// Logger receives the correlator's logs; default slog.Default().
	Logger *slog.Logger
}

// Correlator implements handlers.DeviceCorrelator over NATS; its mapping
// writes go through the engine's one mapping writer.
type Correlator struct {
	cfg Config
	log *slog.Logger
	// mappings is the one mapping writer; the mappings the correlator
	// changes outside an attach are announced through it.
	mappings *engine.MappingWriter

	mu     sync.Mutex
	vms    map[string]*vmTable
	claims map[claimKey]claim
	// releasing counts the Detached calls running per volume: their
	// caller removes the mapping next, so heal leaves it alone.
	releasing map[string]int

	events atomic.Int64
	// delivered is the stream sequence of the last event delivered (or,
	// before any, the one before the consumer's first), and caughtUp
	// whether none was pending after it: then no event stored before it is
	// still to come, and a list takes it for the stream's last sequence
	// without asking.
	delivered atomic.Uint64
	caughtUp  atomic.Bool

	healQ chan string
	// startChecks holds, for each VM with detected mappings when Start
	// listed them, whether those were checked against its devices yet.
	// Set by Start, not changed after.
	startChecks map[string]*startCheck
	// js reads the device events' stream; set by Start.
	js     jetstream.JetStream
	reader *follow.Reader
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	closer lifecycle.Stopper
}

// startCheck is one VM's check at start: done is closed once the
// mappings the VM had then were checked against its devices.
type startCheck struct {
	done chan struct{}
	once sync.Once
}

// vmTable is what the correlator knows of one VM's devices.
type vmTable struct {
	// devices are the VM's disks by kernel name, from events and lists;
	// each carries its identity.
	devices map[string]commands.Device
	// arrived holds when each disk appearance (by identity) was added, as
	// the event stream stored its add event; only events change it, so a
	// list reply racing an event cannot lose it, and Start's replay of
	// the stream brings it back after a restart.
	arrived map[commands.DeviceIdentity]time.Time
	// gone holds the disk appearances removed: an identity never comes
	// back (diskseq and generations are not reused), so a late event of
	// one is stale. Cleared past maxGone entries.
	gone map[commands.DeviceIdentity]bool
	// changed is closed and replaced at every change of devices.
	changed chan struct{}
	// agentAt is when the VM's agent last answered.
	agentAt time.Time
	// listed: devices was filled by a list since the last gap in events
	// and since the last event stored before the list that contradicts it.
	listed bool
	// listedSeq is the stream's last sequence when the last list was
	// asked for: the list shows every event up to it. 0: unknown.
	listedSeq uint64
	// askedAt is when (this host's clock) the last list merged was asked
	// for: a list asked for earlier and answered later is older.
	askedAt time.Time
	// epoch and seq are the agent run and event number of the last event
	// applied: older ones are dropped, a gap makes the VM listed again.
	epoch string
	seq   uint64
	// identity is what the last correlation on the VM went by: 1 identity,
	// -1 size and time, 0 none yet.
	identity int
	// inflight counts the Attached calls waiting on the VM.
	inflight int
	// fallback serializes the size-and-time picks on the VM.
	fallback sync.Mutex
	// names serializes the names requests to the VM's agent, so a set
	// computed earlier never lands after a later one.
	names sync.Mutex
}

// arrivedAt is when d arrived: when the stream stored its add, else when
// its agent says it saw it come (a list reply, say after the add was lost
// in a crash); zero if unknown. c.mu must be held.
func (t *vmTable) arrivedAt(d commands.Device) time.Time {
	if at, ok := t.arrived[d.Identity()]; ok {
		return at
	}
	return d.Time
}

// claimKey is one disk appearance on a VM: a reused kernel name is
// another key.
type claimKey struct {
	vm string
	id commands.DeviceIdentity
}

// claim holds a disk for a volume from its pick until its device goes
// away, its volume is detached, or its mapping is recorded with it (then
// the store holds it). held: the disk was checked and handed out.
type claim struct {
	volumeID string
	held     bool
}

// New returns a Correlator with defaults filled in; Start runs it.
func New(cfg Config) *Correlator {
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.ReleaseTimeout <= 0 {
		cfg.ReleaseTimeout = DefaultReleaseTimeout
	}
	if cfg.Replay <= 0 {
		cfg.Replay = DefaultReplay
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	c := &Correlator{
		cfg:       cfg,
		log:       cfg.Logger.With("component", "correlate"),
		vms:       map[string]*vmTable{},
		claims:    map[claimKey]claim{},
		releasing: map[string]int{},
		healQ:     make(chan string, 256),
	}
	c.mappings = engine.NewMappingWriter(cfg.Store, c.announce, c.log)
	return c
}

// Start follows every agent's device events through one reader of stream
// VOLUMED_DEVICES (package follow: each VM's events are applied in the
// order its agent stored them, and the reader goes on from the next event
// when the cluster member holding its consumer goes), from Config.Replay
// ago, then in the background re-sends the persistent-name set of each VM
// with mappings whose agent answers, and heals its mappings: until then,
// AwaitStartCheck holds the reads of the VMs' mappings.
func (c *Correlator) Start(ctx context.Context) error {
	if c.cfg.Conn == nil || c.cfg.Store == nil {
		return errors.New("correlate: Conn and Store are required")
	}
	all, err := c.cfg.Store.ListMappings(ctx, "")
	if err != nil {
		return fmt.Errorf("correlate: list mappings: %w", err)
	}
	vms := c.startVMs(all)
	js := c.cfg.JetStream
	if js == nil {
		var err error
		if js, err = jetstream.New(c.cfg.Conn); err != nil {
			return fmt.Errorf("correlate: jetstream: %w", err)
		}
	}
	c.js = js
	c.ctx, c.cancel = context.WithCancel(context.WithoutCancel(ctx))
	from := time.Now().Add(-c.cfg.Replay)
	var filters []string
	for _, a := range []commands.DeviceAction{commands.DeviceAdd, commands.DeviceRemove, commands.DeviceChange} {
		filters = append(filters, commands.DeviceSubject("*", a))
	}
	r, err := follow.Start(ctx, js, follow.Config{Stream: bus.StreamDevices, FilterSubjects: filters,
		DeliverPolicy: jetstream.DeliverByStartTimePolicy, OptStartTime: &from, OnConsumer: c.consumerMade,
		Logger: c.log}, c.onEvent)
	if err != nil {
		c.stop()
		return fmt.Errorf("correlate: device events: %w", err)
	}
	c.reader = r
	c.wg.Add(2)
	go c.healLoop()
	go c.resync(vms)
	c.log.Info("device correlator started", "timeout", c.cfg.Timeout, "release_timeout", c.cfg.ReleaseTimeout, "replay", c.cfg.Replay)
	return nil
}

// Close stops following events and waits for the background work. Closing
// twice is safe.
func (c *Correlator) Close(ctx context.Context) error {
	if err := c.closer.Close(ctx, c.stop); err != nil {
		return fmt.Errorf("correlate: close: %w", err)
	}
	return nil
}

func (c *Correlator) stop() {
	if c.reader != nil {
		// Bounded by the reader: the event in hand, then a second to
		// remove its consumer.
		_ = c.reader.Close(context.Background())
	}
	if c.cancel != nil {
		c.cancel()
	}
	c.wg.Wait()
}

// startVMs returns the VMs of the mappings all, this host's first, and
// sets up the start check of each with a detected mapping.
func (c *Correlator) startVMs(all []commands.Mapping) []string {
	c.startChecks = map[string]*startCheck{}
	var vms []string
	for _, m := range all {
		vms = append(vms, m.VMID)
		if m.LinuxState == commands.LinuxDetected && c.startChecks[m.VMID] == nil {
			c.startChecks[m.VMID] = &startCheck{done: make(chan struct{})}
		}
	}
	slices.SortFunc(vms, func(a, b string) int {
		switch {
		case a == b:
			return 0
		case a == c.cfg.LocalVMID:
			return -1
		case b == c.cfg.LocalVMID:
			return 1
		}
		return cmp.Compare(a, b)
	})
	return slices.Compact(vms)
}

// resync re-sends the name sets of the VMs with mappings and has them
// healed; a VM whose agent does not answer has nothing to check its
// mappings with: they stand as recorded. The VMs whose start check did not
// end (their heal failed, or could not list their devices) are tried
// again, after a pause doubling from resyncRetry up to a minute, until it
// ends or the correlator closes: nothing else may come to end it.
func (c *Correlator) resync(vms []string) {
	defer c.wg.Done()
	for pause := resyncRetry; ; pause = min(2*pause, time.Minute) {
		for _, vm := range vms {
			if !c.resyncVM(vm) {
				return
			}
		}
		wait, cancel := context.WithTimeout(c.ctx, pause)
		vms = slices.DeleteFunc(vms, func(vm string) bool {
			_, err := c.AwaitStartCheck(wait, vm)
			return err == nil
		})
		cancel()
		if len(vms) == 0 || c.ctx.Err() != nil {
			return
		}
		c.log.Warn("resync: mappings not checked against the devices yet; trying again", "vms", len(vms))
	}
}

// resyncVM re-sends vm's name set and queues it for healing, or ends its
// start check when its agent does not answer; false once the correlator
// closes.
func (c *Correlator) resyncVM(vm string) bool {
	ctx, cancel := context.WithTimeout(c.ctx, time.Minute)
	defer cancel()
	if !c.HasAgent(ctx, vm) {
		if c.ctx.Err() != nil {
			return false
		}
		c.checked(vm)
		return true
	}
	if _, err := c.setNames(ctx, vm, nil, ""); err != nil {
		c.log.Warn("resync: persistent names", "vm_id", vm, "err", err)
	}
	select {
	case c.healQ <- vm:
		return true
	case <-c.ctx.Done():
		return false
	}
}

// checked ends vm's start check: its mappings were checked against its
// devices, or cannot be.
func (c *Correlator) checked(vm string) {
	if sc := c.startChecks[vm]; sc != nil {
		sc.once.Do(func() { close(sc.done) })
	}
}

// AwaitStartCheck waits until the detected mappings vmID had when the
// correlator started were checked against its devices (the heal at start
// ran, or a reconcile), or found to have no agent to check them with; at
// once for a VM that had none. It reports whether it waited. When ctx
// ends first, it is a *commands.Error SERVICE_UNAVAILABLE: a mapping read
// now could name a disk that is gone or another volume's.
func (c *Correlator) AwaitStartCheck(ctx context.Context, vmID string) (bool, error) {
	sc := c.startChecks[vmID]
	if sc == nil {
		return false, nil
	}
	select {
	case <-sc.done:
		return false, nil
	default:
	}
	select {
	case <-sc.done:
		return true, nil
	case <-ctx.Done():
		return true, commands.Unavailable("the device mappings of VM %s are still being checked against its disks after volumed's start; try again", vmID).
			WithDetail("vm_id", vmID)
	}
}

// table returns the VM's table, making it; c.mu must be held.
func (c *Correlator) table(vm string) *vmTable {
	t := c.vms[vm]
	if t == nil {
		t = &vmTable{devices: map[string]commands.Device{}, arrived: map[commands.DeviceIdentity]time.Time{},
			gone: map[commands.DeviceIdentity]bool{}, changed: make(chan struct{})}
		c.vms[vm] = t
	}
	return t
}

// notify wakes the waiters of t; c.mu must be held.
func (t *vmTable) notify() {
	close(t.changed)
	t.changed = make(chan struct{})
}

// checkDevice refuses a device of an agent's event or list reply whose
// path is not /dev/<its kernel name>, or whose kernel name could name
// something else.
func checkDevice(d commands.Device) error {
	switch {
	case d.Name == "" || d.Name == "." || d.Name == ".." || strings.ContainsAny(d.Name, "/\x00"):
		return fmt.Errorf("bad kernel name %q", d.Name)
	case d.Path != d.Identity().Path():
		return fmt.Errorf("path %q of %s is not /dev/<kernel name>", d.Path, d.Name)
	case d.Major <= 0 || d.Minor < 0:
		return fmt.Errorf("bad device number %d:%d of %s", d.Major, d.Minor, d.Name)
	}
	return nil
}

// consumerMade notes a new consumer of the device events: one with none
// pending is caught up at the sequence before its first (events stored
// before it are not to come), so a list asks the stream nothing until an
// event is delivered; one with some pending is not.
func (c *Correlator) consumerMade(ci *jetstream.ConsumerInfo) {
	if ci.NumPending == 0 {
		c.delivered.Store(max(c.delivered.Load(), ci.Delivered.Stream))
	}
	c.caughtUp.Store(ci.NumPending == 0)
}

// onEvent applies one stored device event to its VM's table.
func (c *Correlator) onEvent(msg jetstream.Msg) {
	parts := strings.Split(msg.Subject(), ".")
	if len(parts) != 3 {
		return
	}
	vm, action := parts[1], commands.DeviceAction(parts[2])
	var d commands.Device
	err := json.Unmarshal(msg.Data(), &d)
	if err == nil {
		err = checkDevice(d)
	}
	if err == nil && d.VMID != "" && d.VMID != vm {
		err = fmt.Errorf("event of VM %s on the subject of VM %s", d.VMID, vm)
	}
	if err != nil {
		c.log.Warn("bad device event", "subject", msg.Subject(), "err", err)
		return
	}
	at, seq := time.Now(), uint64(0)
	if md, err := msg.Metadata(); err == nil {
		at, seq = md.Timestamp, md.Sequence.Stream
		c.delivered.Store(seq)
		c.caughtUp.Store(md.NumPending == 0)
	}
	c.events.Add(1)
	if c.apply(vm, action, d, at, seq) {
		c.queueHeal(vm)
	}
}

// apply applies a device event stored at `at` as the stream's sequence
// seq (0: unknown) to the VM's table, unless it is older than the last
// one applied (same agent run, lower number); false when dropped. An
// event the stream stored before the VM's last list was asked for (its
// sequence at most the list's; replayed at a start, or delivered late)
// leaves the listed devices as they are: the list shows them since, and
// the event would bring back an earlier disk under the name, or the same
// disk without the identity an older agent did not report, which heal
// would take for the mapped disk gone. It still tells when its disk came
// and that it went; one that contradicts the list (an agent whose list
// lagged its events) has the VM listed again. Sequences, not times: the
// stream's clock and this host's may disagree, and an event stamped
// before the list by a clock behind is news all the same.
func (c *Correlator) apply(vm string, action commands.DeviceAction, d commands.Device, at time.Time, seq uint64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := c.table(vm)
	if time.Since(at) < agentTTL && at.After(t.agentAt) {
		t.agentAt = at
	}
	if d.Epoch != "" {
		if d.Epoch == t.epoch && d.EventSeq <= t.seq {
			c.log.Info("device event older than the last applied: dropped", "vm_id", vm, "action", string(action),
				"identity", d.Identity().String(), "event_seq", d.EventSeq, "last", t.seq)
			return false
		}
		if (d.Epoch == t.epoch && d.EventSeq != t.seq+1) || (d.Epoch != t.epoch && t.epoch != "" && d.EventSeq != 1) {
			c.log.Warn("device events missed: listing the VM again", "vm_id", vm, "event_seq", d.EventSeq, "last", t.seq)
			t.listed = false
		}
		t.epoch, t.seq = d.Epoch, d.EventSeq
	}
	id := d.Identity()
	cur, had := t.devices[d.Name]
	stale := t.gone[id] && action != commands.DeviceRemove
	if action == commands.DeviceChange && had && cur.Identity() != id {
		stale = true // a change never changes identity: a late one of an older disk
	}
	if stale {
		c.log.Info("device event of a disk no longer there: dropped", "vm_id", vm, "action", string(action),
			"identity", id.String())
		return false
	}
	d.Action, d.VMID, d.Epoch, d.EventSeq = "", vm, "", 0
	listed := t.listed && seq != 0 && seq <= t.listedSeq
	if listed && contradicts(action, d, cur, had) {
		c.log.Info("device event stored before the last list contradicts it: listing the VM again", "vm_id", vm,
			"action", string(action), "identity", id.String())
		t.listed = false
	}
	switch action {
	case commands.DeviceRemove:
		if !listed {
			if had && cur.Identity() == id {
				delete(t.devices, d.Name)
			}
			c.dropClaims(vm, id)
		}
		delete(t.arrived, id)
		if id.DiskSeq != 0 || id.Generation != 0 { // else the identity is reused
			if len(t.gone) >= maxGone {
				clear(t.gone)
			}
			t.gone[id] = true
		}
	case commands.DeviceAdd, commands.DeviceChange:
		if !listed && had && cur.Identity() != id {
			c.dropClaims(vm, cur.Identity())
			delete(t.arrived, cur.Identity())
		}
		if _, ok := t.arrived[id]; !ok && action == commands.DeviceAdd {
			t.arrived[id] = at
		}
		if !listed {
			t.devices[d.Name] = d
		}
	}
	t.notify()
	return true
}

// contradicts reports whether an event of d would change the table's
// entry under its name (cur, if had).
func contradicts(action commands.DeviceAction, d, cur commands.Device, had bool) bool {
	if action == commands.DeviceRemove {
		return had && cur.Identity() == d.Identity()
	}
	return !had || cur.Identity() != d.Identity() || cur.Size != d.Size || cur.Controller != d.Controller
}

// dropClaims ends the claims of a disk appearance that went away; c.mu
// must be held.
func (c *Correlator) dropClaims(vm string, id commands.DeviceIdentity) {
	delete(c.claims, claimKey{vm, id})
}

// merge replaces the VM's device set with a fresh list, asked for at
// asked (this host's clock) when the stream's last sequence was seq (0:
// unknown), less the disks whose remove was applied already; claims of
// disks no longer there end. A list asked for before the one merged last
// (its reply overtaken) is older than the table, and changes nothing.
func (c *Correlator) merge(vm string, devs []commands.Device, seq uint64, asked time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := c.table(vm)
	t.agentAt = time.Now()
	if asked.Before(t.askedAt) {
		c.log.Info("device list asked for before the last merged: ignored", "vm_id", vm)
		return
	}
	t.askedAt = asked
	t.devices = make(map[string]commands.Device, len(devs))
	present := map[commands.DeviceIdentity]bool{}
	for _, d := range devs {
		if t.gone[d.Identity()] {
			continue // a list taken before the disk's remove event
		}
		t.devices[d.Name] = d
		present[d.Identity()] = true
	}
	for k := range c.claims {
		if k.vm == vm && !present[k.id] {
			delete(c.claims, k)
		}
	}
	t.listed, t.listedSeq = true, seq
	t.notify()
}

// list asks the VM's agent for its devices and merges them into the table.
func (c *Correlator) list(ctx context.Context, vm string, timeout time.Duration) ([]commands.Device, error) {
	seq := c.lastSeq(ctx, timeout)
	asked := time.Now()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	msg, err := c.cfg.Conn.RequestWithContext(ctx, commands.DevicesListSubject(vm), nil)
	if err != nil {
		return nil, fmt.Errorf("%w: list devices of VM %s: %w", ErrAgent, vm, err)
	}
	var devs []commands.Device
	if err := json.Unmarshal(msg.Data, &devs); err != nil {
		var e devagent.ErrorReply
		if json.Unmarshal(msg.Data, &e) == nil && e.Error != "" {
			return nil, fmt.Errorf("%w: list devices of VM %s: %s", ErrAgent, vm, e.Error)
		}
		return nil, fmt.Errorf("%w: list devices of VM %s: %w", ErrAgent, vm, err)
	}
	devs = slices.DeleteFunc(devs, func(d commands.Device) bool {
		err := checkDevice(d)
		if err != nil {
			c.log.Warn("bad device in list reply: ignored", "vm_id", vm, "err", err)
		}
		return err != nil
	})
	c.merge(vm, devs, seq, asked)
	return devs, nil
}

// lastSeq is a sequence of stream VOLUMED_DEVICES up to which every
// event was stored before a list is asked for: the last event delivered
// when none was pending after it, or the sequence before the consumer's
// first when it had none pending (the events stored since, if any, are
// news, as they would be after the list), else the stream's last, asked
// (within timeout, its own: the list keeps all of its). 0 when it cannot
// be told (then every event is news).
func (c *Correlator) lastSeq(ctx context.Context, timeout time.Duration) uint64 {
	if c.caughtUp.Load() {
		return c.delivered.Load()
	}
	if c.js == nil {
		return 0
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	s, err := c.js.Stream(ctx, bus.StreamDevices)
	if err != nil {
		c.log.Debug("device events: stream info", "err", err)
		return 0
	}
	return s.CachedInfo().State.LastSeq
}

// HasAgent reports whether vmID's agent answers a list request within
// 500 ms; a positive answer (or event) is trusted for 10 s.
func (c *Correlator) HasAgent(ctx context.Context, vmID string) bool {
	c.mu.Lock()
	t := c.vms[vmID]
	fresh := t != nil && time.Since(t.agentAt) < agentTTL
	c.mu.Unlock()
	if fresh {
		return true
	}
	_, err := c.list(ctx, vmID, agentProbeTimeout)
	return err == nil
}

// NoIdentity reports whether attaches to vmID must run one at a time:
// until a correlation on the VM has matched by identity, and again after a
// size-and-time match. Overlapping attaches of same-size volumes can only
// be told apart by identity, and a VM's other disks (its root disk, say)
// say nothing of whether the next volume's device will carry one.
func (c *Correlator) NoIdentity(vmID string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := c.vms[vmID]
	return t == nil || t.identity <= 0
}

// Status reports the local agent's health (healthy while its uevent socket
// is live and its last scan succeeded, degraded otherwise), its device
// count and scan interval, and the device events this correlator received.
// Without a local agent the health is unknown and the count is of the
// devices known on every VM.
func (c *Correlator) Status() (health string, deviceCount int, scanInterval time.Duration, events int64) {
	events = c.events.Load()
	if c.cfg.LocalStatus == nil {
		c.mu.Lock()
		defer c.mu.Unlock()
		for _, t := range c.vms {
			deviceCount += len(t.devices)
		}
		return HealthUnknown, deviceCount, 0, events
	}
	st := c.cfg.LocalStatus()
	health = HealthDegraded
	if st.SocketLive && st.LastScanOK {
		health = HealthHealthy
	}
	return health, st.DeviceCount, st.ScanInterval, events
}

// Controller names the bus of a device path known on any VM ("" if none).
func (c *Correlator) Controller(devicePath string) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, t := range c.vms {
		for _, d := range t.devices {
			if d.Path == devicePath {
				return d.Controller
			}
		}
	}
	return ""
}

// queueHeal asks the heal loop to look at vm; a full queue drops the
// request (the periodic reconcile repairs the rest).
func (c *Correlator) queueHeal(vm string) {
	select {
	case c.healQ <- vm:
	default:
		c.log.Warn("heal queue full", "vm_id", vm)
	}
}

// AgentVMs lists the VMs whose agents this correlator has heard from.
func (c *Correlator) AgentVMs() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var vms []string
	for vm, t := range c.vms {
		if !t.agentAt.IsZero() {
			vms = append(vms, vm)
		}
	}
	slices.Sort(vms)
	return vms
}
