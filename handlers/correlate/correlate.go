// Package correlate finds the block device of a volume just attached to a
// VM that runs a device agent (package devagent): it follows the agents'
// device events on devices.<vm_id>.<action>, matches a device to a volume
// by its kernel identity (or, on a VM whose disks show none, by size and
// time), re-checks the device right before handing it over, keeps the
// agents' persistent names, heals mappings whose device came late, and
// repairs drift between mappings and devices.
package correlate

import (
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

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/devagent"
	"github.com/volumed/volumed/handlers"
	"github.com/volumed/volumed/state"
)

// Defaults of Config.
const (
	DefaultTimeout        = 60 * time.Second
	DefaultReleaseTimeout = 30 * time.Second
)

const (
	// agentProbeTimeout bounds the list request of HasAgent.
	agentProbeTimeout = 500 * time.Millisecond
	// agentTTL is how long a positive answer of an agent is trusted.
	agentTTL = 10 * time.Second
	// requestTimeout bounds a list or names request to an agent.
	requestTimeout = 5 * time.Second
	// pollInterval is how often a wait re-lists the VM's devices, should
	// an event be lost.
	pollInterval = time.Second
	// claimGrace keeps a device claimed after Attached returned it, until
	// the caller has recorded the mapping.
	claimGrace = 30 * time.Second
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
	// Store holds the mappings recorded and repaired; required.
	Store state.Store
	// Timeout bounds the wait for a device in Attached; default
	// DefaultTimeout.
	Timeout time.Duration
	// ReleaseTimeout bounds the wait for a device to go in Detached;
	// default DefaultReleaseTimeout.
	ReleaseTimeout time.Duration
	// LocalStatus reports the health of the agent running in this process;
	// nil when there is none.
	LocalStatus func() devagent.Status
	// Logger receives the correlator's logs; default slog.Default().
	Logger *slog.Logger
}

// Correlator implements handlers.DeviceCorrelator over NATS.
type Correlator struct {
	cfg Config
	log *slog.Logger

	mu     sync.Mutex
	vms    map[string]*vmTable
	claims map[claimKey]claim

	events atomic.Int64

	healQ     chan string
	subs      []*nats.Subscription
	ctx       context.Context
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	closeOnce sync.Once
}

var _ handlers.DeviceCorrelator = (*Correlator)(nil)

// vmTable is what the correlator knows of one VM's devices.
type vmTable struct {
	// devices are the VM's disks by kernel name, from events and lists.
	devices map[string]commands.Device
	// arrived holds, by kernel name, when an add event (or a change of
	// device number) reached the correlator; only events change it, so a
	// list reply racing an event cannot lose it.
	arrived map[string]arrival
	// changed is closed and replaced at every change of devices.
	changed chan struct{}
	// agentAt is when the VM's agent last answered.
	agentAt time.Time
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

// arrival is when a device number appeared under a kernel name.
type arrival struct {
	major, minor int
	at           time.Time
}

// arrivedAt is when d arrived, zero if unknown; c.mu must be held.
func (t *vmTable) arrivedAt(d commands.Device) time.Time {
	a, ok := t.arrived[d.Name]
	if !ok || a.major != d.Major || a.minor != d.Minor {
		return time.Time{}
	}
	return a.at
}

type claimKey struct{ vm, path string }

// claim holds a device for a volume while it is correlated, and until
// `until` after (zero: no end yet).
type claim struct {
	volumeID string
	until    time.Time
}

// New returns a Correlator with defaults filled in; Start runs it.
func New(cfg Config) *Correlator {
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.ReleaseTimeout <= 0 {
		cfg.ReleaseTimeout = DefaultReleaseTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Correlator{
		cfg:    cfg,
		log:    cfg.Logger.With("component", "correlate"),
		vms:    map[string]*vmTable{},
		claims: map[claimKey]claim{},
		healQ:  make(chan string, 256),
	}
}

// Start subscribes to every agent's device events, then in the background
// re-sends the persistent-name set of each VM with mappings whose agent
// answers, and heals its missing mappings.
func (c *Correlator) Start(ctx context.Context) error {
	if c.cfg.Conn == nil || c.cfg.Store == nil {
		return errors.New("correlate: Conn and Store are required")
	}
	c.ctx, c.cancel = context.WithCancel(context.WithoutCancel(ctx))
	for _, a := range []commands.DeviceAction{commands.DeviceAdd, commands.DeviceRemove, commands.DeviceChange} {
		sub, err := c.cfg.Conn.Subscribe(commands.DeviceSubject("*", a), bus.Published(c.onEvent))
		if err != nil {
			c.stop()
			return fmt.Errorf("correlate: subscribe: %w", err)
		}
		c.subs = append(c.subs, sub)
	}
	if err := c.cfg.Conn.FlushTimeout(requestTimeout); err != nil {
		c.stop()
		return fmt.Errorf("correlate: flush subscriptions: %w", err)
	}
	c.wg.Add(2)
	go c.healLoop()
	go c.resync()
	c.log.Info("device correlator started", "timeout", c.cfg.Timeout, "release_timeout", c.cfg.ReleaseTimeout)
	return nil
}

// Close stops following events and waits for the background work. Closing
// twice is safe.
func (c *Correlator) Close(ctx context.Context) error {
	c.closeOnce.Do(c.stop)
	return nil
}

func (c *Correlator) stop() {
	for _, sub := range c.subs {
		_ = sub.Unsubscribe()
	}
	if c.cancel != nil {
		c.cancel()
	}
	c.wg.Wait()
}

// resync re-sends the name sets of the VMs with mappings and queues them
// for healing.
func (c *Correlator) resync() {
	defer c.wg.Done()
	ctx, cancel := context.WithTimeout(c.ctx, time.Minute)
	defer cancel()
	all, err := c.cfg.Store.ListMappings(ctx, "")
	if err != nil {
		c.log.Warn("resync: list mappings", "err", err)
		return
	}
	var vms []string
	for _, m := range all {
		vms = append(vms, m.VMID)
	}
	slices.Sort(vms)
	for _, vm := range slices.Compact(vms) {
		if !c.HasAgent(ctx, vm) {
			continue
		}
		if _, err := c.setNames(ctx, vm, nil, ""); err != nil {
			c.log.Warn("resync: persistent names", "vm_id", vm, "err", err)
		}
		c.queueHeal(vm)
	}
}

// table returns the VM's table, making it; c.mu must be held.
func (c *Correlator) table(vm string) *vmTable {
	t := c.vms[vm]
	if t == nil {
		t = &vmTable{devices: map[string]commands.Device{}, arrived: map[string]arrival{}, changed: make(chan struct{})}
		c.vms[vm] = t
	}
	return t
}

// notify wakes the waiters of t; c.mu must be held.
func (t *vmTable) notify() {
	close(t.changed)
	t.changed = make(chan struct{})
}

// onEvent applies a device event to its VM's table.
func (c *Correlator) onEvent(msg *nats.Msg) {
	parts := strings.Split(msg.Subject, ".")
	if len(parts) != 3 {
		return
	}
	vm, action := parts[1], commands.DeviceAction(parts[2])
	var d commands.Device
	if err := json.Unmarshal(msg.Data, &d); err != nil || d.Name == "" {
		c.log.Warn("bad device event", "subject", msg.Subject, "err", err)
		return
	}
	c.events.Add(1)
	now := time.Now()
	c.mu.Lock()
	t := c.table(vm)
	t.agentAt = now
	switch action {
	case commands.DeviceRemove:
		delete(t.devices, d.Name)
		delete(t.arrived, d.Name)
	case commands.DeviceAdd, commands.DeviceChange:
		if action == commands.DeviceAdd {
			t.arrived[d.Name] = arrival{major: d.Major, minor: d.Minor, at: now}
		}
		d.Action, d.VMID = "", vm
		t.devices[d.Name] = d
	}
	t.notify()
	c.mu.Unlock()
	c.queueHeal(vm)
}

// merge replaces the VM's device set with a fresh list.
func (c *Correlator) merge(vm string, devs []commands.Device) {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := c.table(vm)
	t.agentAt = time.Now()
	t.devices = make(map[string]commands.Device, len(devs))
	for _, d := range devs {
		t.devices[d.Name] = d
	}
	t.notify()
}

// list asks the VM's agent for its devices and merges them into the table.
func (c *Correlator) list(ctx context.Context, vm string, timeout time.Duration) ([]commands.Device, error) {
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
	c.merge(vm, devs)
	return devs, nil
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
