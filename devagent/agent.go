// Package devagent is the kernel side of device correlation: it keeps the
// set of block disks of this machine from kernel uevents and /sys/block
// scans, publishes add/remove/change, reads disk identities (virtio serial,
// SCSI WWID, loop backing file), matches them to CloudStack volumes, and
// gives attached volumes persistent names.
package devagent

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/backoff"
)

// DefaultScanInterval is how often the agent rescans /sys/block when
// nothing else made it rescan.
const DefaultScanInterval = 30 * time.Second

const (
	// publishTimeout bounds one Publish call.
	publishTimeout = 10 * time.Second
	// ueventBuffer is how many uevents may wait for the agent's loop.
	ueventBuffer = 256
)

// Errors of the Agent's lifecycle.
var (
	ErrStarted = errors.New("devagent: agent already started")
	ErrClosed  = errors.New("devagent: agent closed")
)

// Config configures an Agent. Zero fields take the documented defaults.
type Config struct {
	// VMID is put into every published device.
	VMID string
	// SysRoot is the sysfs mount point; default DefaultSysRoot.
	SysRoot string
	// ScanInterval is the period of the repairing full scan; default
	// DefaultScanInterval.
	ScanInterval time.Duration
	// Source delivers uevents; nil opens NewKobjectSource at Start. The
	// agent closes it on Close.
	Source EventSource
	// Publish, when set, is called for every add, remove and change, one
	// at a time, with a timeout. A failed event is retried at the next scan.
	Publish func(ctx context.Context, d commands.Device) error
	// Ignore hides more disks, by kernel name or dm name. Devices named
	// like the Namer's (IsPersistentName, e.g. a dm device volXXXXXXXX)
	// are always hidden.
	Ignore func(name string) bool
	// Logger is the parent logger; default slog.Default().
	Logger *slog.Logger
}

// Status is the agent's health.
type Status struct {
	// SocketLive: the uevent source is open and its last Receive succeeded.
	SocketLive bool
	// LastScanOK: the last full scan read every disk.
	LastScanOK bool
	// LastScan is when the last full scan ended; zero before the first.
	LastScan time.Time
	// DeviceCount counts the disks the agent knows.
	DeviceCount int
	// ScanInterval is the period of the full scan.
	ScanInterval time.Duration
	// EventsProcessed counts uevents handled, of every subsystem.
	EventsProcessed int64
	// PublishPending counts events whose Publish failed, awaiting retry.
	PublishPending int
}

// Agent keeps the current set of disks from uevents and full scans of
// /sys/block, and reports every difference as an add, remove or change.
// A disk counts as present once it has a non-zero size; a size or identity
// change is a change. It scans at Start, after a receive error, after a gap
// in SEQNUM, and every ScanInterval.
type Agent struct {
	cfg   Config
	sysfs Sysfs
	log   *slog.Logger

	// epoch names this run of the agent in its events.
	epoch string

	mu sync.Mutex
	// eventSeq numbers the events emitted; generation numbers the
	// appearances of disks without diskseq.
	eventSeq   uint64
	generation uint64
	known      map[string]commands.Device
	pending    map[commands.DeviceIdentity]commands.Device // events whose Publish failed, by disk
	subs       map[*subscription]struct{}
	lastScan   time.Time
	lastScanOK bool
	started    bool
	closed     bool
	cancel     context.CancelFunc
	src        EventSource

	socketLive atomic.Bool
	processed  atomic.Int64

	uevents   chan Uevent
	scanReq   chan struct{}
	closeOnce sync.Once
	wg        sync.WaitGroup
}

// New returns an Agent with cfg's defaults filled in; Start runs it.
func New(cfg Config) *Agent {
	if cfg.SysRoot == "" {
		cfg.SysRoot = DefaultSysRoot
	}
	if cfg.ScanInterval <= 0 {
		cfg.ScanInterval = DefaultScanInterval
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Agent{
		cfg:        cfg,
		epoch:      strconv.FormatInt(time.Now().UnixNano(), 36),
		generation: uint64(time.Now().UnixMicro()),
		sysfs:      Sysfs{Root: cfg.SysRoot, Ignore: ignore(cfg.Ignore)},
		log:        cfg.Logger.With("component", "devagent", "vm_id", cfg.VMID),
		known:      map[string]commands.Device{},
		pending:    map[commands.DeviceIdentity]commands.Device{},
		subs:       map[*subscription]struct{}{},
		uevents:    make(chan Uevent, ueventBuffer),
		scanReq:    make(chan struct{}, 1),
	}
}

// ignore hides persistent names and whatever extra hides.
func ignore(extra func(string) bool) func(string) bool {
	if extra == nil {
		return IsPersistentName
	}
	return func(name string) bool { return IsPersistentName(name) || extra(name) }
}

// Start opens the uevent source, then scans /sys/block once (so Devices is
// filled when Start returns) and runs until Close. Without a uevent socket
// the agent runs on scans alone and Status reports SocketLive false. ctx
// bounds the first scan only.
func (a *Agent) Start(ctx context.Context) error {
	a.mu.Lock()
	switch {
	case a.closed:
		a.mu.Unlock()
		return ErrClosed
	case a.started:
		a.mu.Unlock()
		return ErrStarted
	}
	a.started = true
	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	a.cancel = cancel
	src := a.cfg.Source
	if src == nil {
		var err error
		if src, err = NewKobjectSource(); err != nil {
			a.log.Error("no uevent socket; running on scans alone", "err", err)
		}
	}
	a.src = src
	a.wg.Add(1) // the loop
	if src != nil {
		a.wg.Add(1)
		a.socketLive.Store(true)
	}
	a.mu.Unlock()

	if src != nil {
		go a.receive(runCtx, src)
	}
	if err := a.scan(ctx); err != nil {
		a.wg.Done() // the loop never runs
		return errors.Join(fmt.Errorf("devagent: first scan: %w", err), a.Close(ctx))
	}
	go a.run(runCtx)
	return nil
}

// Close stops the agent, closes its uevent source and subscriptions, and
// waits for its goroutines until ctx ends. Closing twice is safe.
func (a *Agent) Close(ctx context.Context) error {
	var err error
	a.closeOnce.Do(func() {
		a.mu.Lock()
		a.closed = true
		cancel, src, subs := a.cancel, a.src, slices.Collect(maps.Keys(a.subs))
		clear(a.subs)
		a.mu.Unlock()
		if cancel != nil {
			cancel()
		}
		if src != nil {
			if cerr := src.Close(); cerr != nil {
				err = fmt.Errorf("devagent: close uevent source: %w", cerr)
			}
		}
		for _, s := range subs {
			s.stop()
		}
	})
	done := make(chan struct{})
	go func() {
		a.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return err
	case <-ctx.Done():
		return errors.Join(err, fmt.Errorf("devagent: close: %w", ctx.Err()))
	}
}

// Devices returns the disks present, sorted by name; each one's Time is
// when the agent saw it come.
func (a *Agent) Devices() []commands.Device {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := slices.Collect(maps.Values(a.known))
	slices.SortFunc(out, func(x, y commands.Device) int { return strings.Compare(x.Name, y.Name) })
	return out
}

// Device returns the disk with kernel name name, if present.
func (a *Agent) Device(name string) (commands.Device, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	d, ok := a.known[name]
	return d, ok
}

// Status reports the agent's health.
func (a *Agent) Status() Status {
	a.mu.Lock()
	defer a.mu.Unlock()
	return Status{
		SocketLive:      a.socketLive.Load(),
		LastScanOK:      a.lastScanOK,
		LastScan:        a.lastScan,
		DeviceCount:     len(a.known),
		ScanInterval:    a.cfg.ScanInterval,
		EventsProcessed: a.processed.Load(),
		PublishPending:  len(a.pending),
	}
}

// receiveBackoff is the wait between receive errors.
var receiveBackoff = backoff.Policy{Min: 10 * time.Millisecond, Max: time.Second}

// receive reads uevents into a.uevents, asking for a rescan after a
// receive error or a SEQNUM gap, until ctx ends or the source is closed.
func (a *Agent) receive(ctx context.Context, src EventSource) {
	defer a.wg.Done()
	defer a.socketLive.Store(false)
	var last uint64
	wait := receiveBackoff.Start()
	for {
		u, err := src.Receive()
		if ctx.Err() != nil || errors.Is(err, ErrSourceClosed) {
			return
		}
		if err != nil {
			a.socketLive.Store(false)
			a.log.Warn("uevent receive failed; rescanning", "err", err)
			a.requestScan()
			if !wait.Wait(ctx, 0) {
				return
			}
			continue
		}
		a.socketLive.Store(true)
		wait.Reset()
		if last != 0 && u.Seqnum > last+1 {
			a.log.Info("uevent seqnum gap; rescanning", "after", last, "seqnum", u.Seqnum)
			a.requestScan()
		}
		last = u.Seqnum
		select {
		case a.uevents <- u:
		case <-ctx.Done():
			return
		}
	}
}

// requestScan asks the loop for a full scan; requests coalesce.
func (a *Agent) requestScan() {
	select {
	case a.scanReq <- struct{}{}:
	default:
	}
}

// run is the agent's loop: every change to the device set happens here.
func (a *Agent) run(ctx context.Context) {
	defer a.wg.Done()
	tick := time.NewTicker(a.cfg.ScanInterval)
	defer tick.Stop()
	for {
		var err error
		select {
		case <-ctx.Done():
			return
		case u := <-a.uevents:
			a.handle(ctx, u)
		case <-a.scanReq:
			err = a.scan(ctx)
		case <-tick.C:
			err = a.scan(ctx)
		}
		if err != nil {
			a.log.Error("scan failed", "err", err)
		}
	}
}

// handle re-reads the disk a block uevent is about and applies it. An add
// or remove uevent for a disk the agent knows without a kernel diskseq
// means a new disk, whatever sysfs shows by now.
func (a *Agent) handle(ctx context.Context, u Uevent) {
	defer a.processed.Add(1)
	if !u.IsDisk() {
		return
	}
	d, ok, err := a.sysfs.Disk(u.Name())
	if err != nil {
		a.log.Warn("read disk failed; rescanning", "device", u.Name(), "err", err)
		a.requestScan()
		return
	}
	renew := u.Action == string(commands.DeviceAdd) || u.Action == string(commands.DeviceRemove)
	a.apply(ctx, u.Name(), d, ok, u.Seqnum, renew)
}

// scan reads all of /sys/block and applies every difference with the known
// set; a disk that could not be read keeps its known state. Then it retries
// failed publishes.
func (a *Agent) scan(ctx context.Context) error {
	present, failed, err := a.sysfs.scan()
	if err == nil {
		a.mu.Lock()
		names := slices.Collect(maps.Keys(a.known))
		a.mu.Unlock()
		names = slices.AppendSeq(names, maps.Keys(present))
		slices.Sort(names)
		for _, n := range slices.Compact(names) {
			if _, bad := failed[n]; !bad {
				d, ok := present[n]
				a.apply(ctx, n, d, ok, 0, false)
			}
		}
		a.retryPending(ctx)
		for n, ferr := range failed {
			a.log.Warn("read disk failed", "device", n, "err", ferr)
		}
	}
	a.mu.Lock()
	a.lastScan, a.lastScanOK = time.Now(), err == nil && len(failed) == 0
	a.mu.Unlock()
	return err
}

// apply compares the disk name as just read (d, present) with what the
// agent knew, and on a difference records it and emits the events. A disk
// whose identity changed under the same name (diskseq, device number,
// serial, WWID, NGUID, EUI or backing file; or, without a diskseq, an add
// or remove uevent: renew) is a remove of the old disk followed by an add
// of the new one, never a change. Events are numbered in emission order.
func (a *Agent) apply(ctx context.Context, name string, d commands.Device, present bool, seqnum uint64, renew bool) {
	a.mu.Lock()
	old, had := a.known[name]
	var evs []commands.Device
	switch {
	case had && (!present || replaced(old, d) || (renew && old.DiskSeq == 0)):
		rm := old
		rm.Action = commands.DeviceRemove
		evs = append(evs, rm)
		delete(a.known, name)
		if present {
			evs = append(evs, a.added(d))
		}
	case present && !had:
		evs = append(evs, a.added(d))
	case present && differs(old, d):
		d.Generation = old.Generation
		ev := d
		ev.Action = commands.DeviceChange
		evs = append(evs, ev)
	default:
		a.mu.Unlock()
		return
	}
	now := time.Now().UTC()
	for i := range evs {
		a.eventSeq++
		evs[i].VMID, evs[i].Seqnum, evs[i].Time = a.cfg.VMID, seqnum, now
		evs[i].Epoch, evs[i].EventSeq = a.epoch, a.eventSeq
		if evs[i].Action != commands.DeviceRemove {
			cur := evs[i]
			cur.Action, cur.Epoch, cur.EventSeq = "", "", 0
			if evs[i].Action == commands.DeviceChange {
				cur.Time = old.Time // the known set keeps when the disk came
			}
			a.known[name] = cur
		}
	}
	subs := slices.Collect(maps.Keys(a.subs))
	// Pushed under mu, so that subscribers see the events in EventSeq order.
	for _, ev := range evs {
		for _, s := range subs {
			s.push(ev)
		}
	}
	a.mu.Unlock()

	for _, ev := range evs {
		a.log.Info("device event", "action", string(ev.Action), "device", ev.Name, "identity", ev.Identity().String(),
			"size", ev.Size, "seqnum", seqnum, "event_seq", ev.EventSeq,
			"serial", ev.Serial, "wwid", ev.WWID, "backing_file", ev.BackingFile)
		a.publish(ctx, ev)
	}
}

// added is d as a new disk: without a kernel diskseq it gets the next
// generation; a.mu must be held.
func (a *Agent) added(d commands.Device) commands.Device {
	if d.DiskSeq == 0 {
		a.generation++
		d.Generation = a.generation
	}
	d.Action = commands.DeviceAdd
	return d
}

// replaced reports whether b, read under a's kernel name, is another disk:
// another diskseq, device number or volume identity.
func replaced(a, b commands.Device) bool {
	return a.DiskSeq != b.DiskSeq || a.Major != b.Major || a.Minor != b.Minor || a.Serial != b.Serial ||
		a.WWID != b.WWID || a.NGUID != b.NGUID || a.EUI != b.EUI || a.BackingFile != b.BackingFile
}

// differs reports a change of size or controller of the same disk.
func differs(a, b commands.Device) bool {
	return a.Size != b.Size || a.Controller != b.Controller
}

// publish hands ev to Config.Publish, first folding in an earlier event for
// the same disk whose Publish failed; on failure ev waits for retryPending.
func (a *Agent) publish(ctx context.Context, ev commands.Device) {
	if a.cfg.Publish == nil {
		return
	}
	a.mu.Lock()
	prev, had := a.pending[ev.Identity()]
	delete(a.pending, ev.Identity())
	a.mu.Unlock()
	if had {
		var ok bool
		if ev, ok = fold(prev, ev); !ok {
			return
		}
	}
	pctx, cancel := context.WithTimeout(ctx, publishTimeout)
	defer cancel()
	if err := a.cfg.Publish(pctx, ev); err != nil {
		a.log.Warn("publish failed; retrying at next scan", "device", ev.Name, "action", string(ev.Action), "err", err)
		a.mu.Lock()
		a.pending[ev.Identity()] = ev
		a.mu.Unlock()
	}
}

// fold merges an unpublished event with the next one for the same disk:
// an unseen add followed by a change is still an add, and an unseen add
// followed by a remove is nothing to publish (false).
func fold(unpublished, next commands.Device) (commands.Device, bool) {
	if unpublished.Action != commands.DeviceAdd {
		return next, true
	}
	switch next.Action {
	case commands.DeviceChange:
		next.Action = commands.DeviceAdd
	case commands.DeviceRemove:
		return commands.Device{}, false
	}
	return next, true
}

// retryPending publishes again every event whose Publish failed.
func (a *Agent) retryPending(ctx context.Context) {
	a.mu.Lock()
	evs := slices.Collect(maps.Values(a.pending))
	clear(a.pending)
	a.mu.Unlock()
	slices.SortFunc(evs, func(x, y commands.Device) int { return cmp.Compare(x.EventSeq, y.EventSeq) })
	for _, ev := range evs {
		a.publish(ctx, ev)
	}
}
