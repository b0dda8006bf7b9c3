package devagent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/backoff"
	"github.com/volumed/volumed/internal/lifecycle"
)

// Retries of one event's JetStream publish: the first failure waits
// publishRetryMin, doubling up to publishRetryMax, publishAttempts in all.
const (
	publishAttempts = 5
	publishRetryMin = 100 * time.Millisecond
	publishRetryMax = 2 * time.Second
)

// agentCatchUp is how long a names request waits for the agent to know a
// present disk it has not handled yet, before asking it to rescan; the
// request waits as long again for the scan.
const agentCatchUp = time.Second

// NamesMessage is the body of a devices.<vm_id>.names request (Names only)
// and of its reply.
type NamesMessage struct {
	// Names maps a persistent name (volXXXXXXXX) to a device path: in a
	// request the full set the VM must hold, in a reply the set it holds.
	Names map[string]string `json:"names"`
	// Identities gives, in a request, the identity the disk of each name
	// must have now: a name whose target is another disk (its name reused)
	// is not made, and is removed.
	Identities map[string]commands.DeviceIdentity `json:"identities,omitempty"`
	// Dir is the directory the names appear in (reply only).
	Dir string `json:"dir,omitempty"`
	// Previous is the set held before the request (reply only).
	Previous map[string]string `json:"previous,omitempty"`
	// Skipped gives, for each requested name not made, the reason (reply
	// only): its target is not a present disk, is another disk, or is a
	// disk the agent does not know.
	Skipped map[string]string `json:"skipped,omitempty"`
	// Error says why a request was refused as a whole (reply only).
	Error string `json:"error,omitempty"`
}

// ErrorReply is the reply of a devices.<vm_id>.list request that failed.
type ErrorReply struct {
	// Error says why the list failed.
	Error string `json:"error"`
}

// UsersRequest is the body of a devices.<vm_id>.users request: who uses
// the disk of Identity?
type UsersRequest struct {
	// Identity is the disk asked about, as the mapping records it.
	Identity commands.DeviceIdentity `json:"identity"`
	// Aliases are more paths naming it (its persistent name).
	Aliases []string `json:"aliases,omitempty"`
}

// UsersReply is the reply of a devices.<vm_id>.users request.
type UsersReply struct {
	// Users are who uses the disk; empty when it is free.
	Users []commands.DeviceUser `json:"users,omitempty"`
	// Gone: the disk of that identity is not present (nothing uses it).
	Gone bool `json:"gone,omitempty"`
	// Error says why the request failed.
	Error string `json:"error,omitempty"`
}

// maxAliases bounds the aliases of a users request.
const maxAliases = 16

// ServerConfig configures a Server.
type ServerConfig struct {
	// VMID is the VM the agent runs on: the <vm_id> of its subjects.
	VMID string
	// Conn is the NATS connection the server answers on; required.
	Conn *nats.Conn
	// JetStream publishes the events; nil makes one on Conn.
	JetStream jetstream.JetStream
	// Agent is the agent whose events are published; required.
	Agent *Agent
	// Namer keeps the persistent names; nil means NewNames("", "").
	Namer Names
	// SysRoot is the sysfs the list and names requests re-read; default
	// DefaultSysRoot.
	SysRoot string
	// ProcRoot is the procfs the users requests read; default
	// DefaultProcRoot. This process's own open files do not count.
	ProcRoot string
	// Logger is the parent logger; default slog.Default().
	Logger *slog.Logger
}

// Server is the agent's NATS side: it publishes every agent event to
// JetStream on devices.<vm_id>.<action>, answers devices.<vm_id>.list with
// the disks present (re-read from sysfs), makes the persistent names
// exactly the name set of each devices.<vm_id>.names request, and
// answers devices.<vm_id>.users with who uses a disk (Usage).
type Server struct {
	cfg   ServerConfig
	log   *slog.Logger
	sysfs Sysfs

	// mu guards desired and closed and serializes every change to the
	// names.
	mu sync.Mutex
	// closed: Close has begun; the names are changed no more, as no
	// event would drop a name made now.
	closed bool
	// desired is the last requested name set (at start: the names found
	// and kept), less names whose device went away since: name → the
	// disk's identity as the agent knows it.
	desired map[string]commands.DeviceIdentity

	subs  []*nats.Subscription
	unsub func()
	// runCtx is cancelled by Close; the names requests run under it.
	runCtx context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	closer lifecycle.Stopper
}

// NewServer returns a Server with defaults filled in; Start runs it.
func NewServer(cfg ServerConfig) *Server {
	if cfg.Namer == nil {
		cfg.Namer = NewNames("", "")
	}
	if cfg.SysRoot == "" {
		cfg.SysRoot = DefaultSysRoot
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Server{
		cfg:   cfg,
		log:   cfg.Logger.With("component", "devagent-server", "vm_id", cfg.VMID),
		sysfs: Sysfs{Root: cfg.SysRoot, Ignore: IsPersistentName},
	}
}

// Start keeps the persistent names it finds whose disk is proven theirs
// (keepFound) and removes the others, then subscribes to the agent's
// events and answers the request subjects. The Agent must be started.
func (s *Server) Start(ctx context.Context) error {
	if s.cfg.VMID == "" || s.cfg.Conn == nil || s.cfg.Agent == nil {
		return errors.New("devagent: server needs VMID, Conn and Agent")
	}
	if strings.ContainsAny(s.cfg.VMID, ".*> \t") {
		return fmt.Errorf("devagent: VM id %q cannot be a subject token", s.cfg.VMID)
	}
	if s.cfg.JetStream == nil {
		js, err := jetstream.New(s.cfg.Conn)
		if err != nil {
			return fmt.Errorf("devagent: jetstream: %w", err)
		}
		s.cfg.JetStream = js
	}
	// Subscribed before the names are read: an event in between is not
	// missed.
	events, unsubEvents := s.cfg.Agent.Subscribe()
	ends, unsubEnds := s.cfg.Agent.Subscribe()
	unsub := func() { unsubEvents(); unsubEnds() }
	found, err := s.cfg.Namer.List(ctx)
	if err != nil {
		unsub()
		return fmt.Errorf("devagent: read persistent names: %w", err)
	}
	s.desired = map[string]commands.DeviceIdentity{}
	for _, name := range slices.Sorted(maps.Keys(found)) {
		s.keepFound(ctx, name, found[name])
	}
	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	s.runCtx, s.cancel = runCtx, cancel
	s.unsub = unsub
	s.wg.Add(2)
	// One publishes the events in order, each after the names it ends are
	// gone; the other drops the names as the events come, without waiting
	// for the events before them to be published (JetStream may be slow
	// or down).
	go s.each(runCtx, events, func(ev commands.Device) { s.dropNamesOf(runCtx, ev); s.publish(runCtx, ev) })
	go s.each(runCtx, ends, func(ev commands.Device) { s.dropNamesOf(runCtx, ev) })
	for subject, handle := range map[string]nats.MsgHandler{
		commands.DevicesListSubject(s.cfg.VMID):  s.serveList,
		commands.DevicesNamesSubject(s.cfg.VMID): s.serveNames,
		commands.DevicesUsersSubject(s.cfg.VMID): s.serveUsers,
	} {
		sub, err := s.cfg.Conn.Subscribe(subject, bus.Published(s.inboxOnly(handle)))
		if err != nil {
			s.stop()
			return fmt.Errorf("devagent: subscribe %s: %w", subject, err)
		}
		s.subs = append(s.subs, sub)
	}
	if err := s.cfg.Conn.FlushTimeout(publishTimeout); err != nil {
		s.stop()
		return fmt.Errorf("devagent: flush subscriptions: %w", err)
	}
	s.log.Info("device agent serving", "names_dir", s.cfg.Namer.Dir(), "names", len(s.desired), "names_removed", len(found)-len(s.desired))
	return nil
}

// Close stops answering and publishing and waits for the publisher and
// for a names request changing the names; a names request answered later
// changes nothing. Closing twice is safe.
func (s *Server) Close(ctx context.Context) error {
	if err := s.closer.Close(ctx, s.stop); err != nil {
		return fmt.Errorf("devagent: close: %w", err)
	}
	return nil
}

func (s *Server) stop() {
	for _, sub := range s.subs {
		_ = sub.Unsubscribe()
	}
	// Waits for a names change in flight; the next ones, and those woken
	// by the cancel below, change nothing.
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	if s.cancel != nil {
		s.cancel()
	}
	if s.unsub != nil {
		s.unsub()
	}
	s.wg.Wait()
}

// keepFound keeps a name found at start, recorded with the agent's
// identity of its disk, only if that disk is proven the one it was made
// for: a present disk the agent knows whose kernel identity carries the
// name (carriesName). Which disk an earlier run named is recorded nowhere,
// and while volumed was down that disk may have gone and another volume's
// disk taken its kernel name: any other name is removed at once, before a
// request is answered, and made again by the first names request for the
// disk its volume has now. A name that cannot be removed is logged and
// left to that request.
func (s *Server) keepFound(ctx context.Context, name, target string) {
	d, k, why := s.disk(target)
	if why == "" && carriesName(d, name) {
		s.desired[name] = k.Identity()
		return
	}
	if why == "" {
		why = fmt.Sprintf("%s (disk %s) does not carry the name's volume identity", target, k.Identity())
	}
	if err := s.cfg.Namer.Remove(ctx, name); err != nil {
		s.log.Error("persistent name found at start, not proven, not removed", "name", name, "target", target, "reason", why, "err", err)
		return
	}
	s.log.Info("persistent name found at start removed: its disk is not proven the named volume's", "name", name,
		"target", target, "reason", why)
}

// disk returns the present disk target (/dev/<kernel name>) as sysfs
// shows it now and the agent's record of it, or why there is none the
// agent knows.
func (s *Server) disk(target string) (d, k commands.Device, why string) {
	d, ok, err := s.sysfs.Disk(strings.TrimPrefix(target, "/dev/"))
	k, known := s.known(d)
	switch {
	case err != nil:
		return d, k, err.Error()
	case !ok || d.Path != target:
		return d, k, fmt.Sprintf("%s is not a present disk", target)
	case !known:
		return d, k, fmt.Sprintf("%s (disk %s) is not known to the device agent yet", target, d.Identity())
	}
	return d, k, ""
}

// each calls handle for every event, in order, until ctx ends or events
// closes.
func (s *Server) each(ctx context.Context, events <-chan commands.Device, handle func(commands.Device)) {
	defer s.wg.Done()
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-events:
			if !ok {
				return
			}
			handle(ev)
		}
	}
}

// publish sends one event to JetStream, retrying with backoff; the message
// id (agent run and event number) makes a retry of a stored event a
// duplicate the stream ignores.
func (s *Server) publish(ctx context.Context, ev commands.Device) {
	ev.VMID = s.cfg.VMID
	data, err := json.Marshal(ev)
	if err != nil {
		s.log.Error("encode device event", "device", ev.Name, "err", err)
		return
	}
	subject := commands.DeviceSubject(s.cfg.VMID, ev.Action)
	id := strings.Join([]string{s.cfg.VMID, ev.Epoch, strconv.FormatUint(ev.EventSeq, 10), ev.Name, string(ev.Action)}, "/")
	wait := backoff.Policy{Min: publishRetryMin, Max: publishRetryMax}.Start()
	for attempt := 1; ; attempt++ {
		pctx, cancel := context.WithTimeout(ctx, publishTimeout)
		_, err = s.cfg.JetStream.Publish(pctx, subject, data, jetstream.WithMsgID(id))
		cancel()
		if err == nil || ctx.Err() != nil {
			return
		}
		if attempt == publishAttempts {
			s.log.Error("device event not stored", "subject", subject, "device", ev.Name, "err", err)
			return
		}
		s.log.Warn("device event publish failed; retrying", "subject", subject, "device", ev.Name, "err", err)
		if !wait.Wait(ctx, 0) {
			return
		}
	}
}

// dropNamesOf removes and forgets the names of the disk a remove event
// ends.
func (s *Server) dropNamesOf(ctx context.Context, ev commands.Device) {
	if ev.Action != commands.DeviceRemove {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for name, id := range s.desired {
		if id != ev.Identity() {
			continue
		}
		delete(s.desired, name)
		if err := s.cfg.Namer.Remove(ctx, name); err != nil {
			s.log.Warn("remove persistent name", "name", name, "err", err)
			continue
		}
		s.log.Info("persistent name removed: device gone", "name", name, "device", ev.Path, "identity", ev.Identity().String())
	}
}

// serveList answers with the disks present, re-read from sysfs, with the
// agent's generations and arrival times.
func (s *Server) serveList(msg *nats.Msg) {
	disks, err := s.sysfs.Disks()
	if err != nil {
		if disks == nil {
			s.reply(msg, ErrorReply{Error: err.Error()})
			return
		}
		s.log.Warn("some disks unreadable", "err", err)
	}
	for i := range disks {
		disks[i].VMID = s.cfg.VMID
		// The agent's word for the disk it knows: when it came, and without
		// a kernel diskseq its generation (a disk the agent has not seen
		// yet has none, and matches no recorded one).
		if k, ok := s.cfg.Agent.Device(disks[i].Name); ok && !replaced(k, disks[i]) {
			disks[i].Generation, disks[i].Time = k.Generation, k.Time
		}
	}
	s.reply(msg, disks)
}

// serveNames makes the persistent names exactly the requested set.
func (s *Server) serveNames(msg *nats.Msg) {
	var req NamesMessage
	if err := json.Unmarshal(msg.Data, &req); err != nil {
		s.reply(msg, NamesMessage{Error: fmt.Sprintf("bad names request: %v", err)})
		return
	}
	if err := checkNames(req.Names, req.Identities); err != nil {
		s.reply(msg, NamesMessage{Error: err.Error()})
		return
	}
	s.awaitAgent(s.runCtx, req.Names)
	s.reply(msg, s.apply(s.runCtx, req.Names, req.Identities))
}

// serveUsers answers who uses the disk of the requested identity: its
// mounts, holders and the processes other than this one with it open.
func (s *Server) serveUsers(msg *nats.Msg) {
	var req UsersRequest
	if err := json.Unmarshal(msg.Data, &req); err != nil {
		s.reply(msg, UsersReply{Error: fmt.Sprintf("bad users request: %v", err)})
		return
	}
	id := req.Identity
	if len(req.Aliases) > maxAliases {
		s.reply(msg, UsersReply{Error: fmt.Sprintf("more than %d aliases", maxAliases)})
		return
	}
	d, ok, err := s.sysfs.Disk(id.Name)
	switch {
	case err != nil:
		s.reply(msg, UsersReply{Error: err.Error()})
		return
	case !ok || (id.Major != 0 && !s.sameDisk(id, d)):
		// Gone, or another disk under the name now. An identity with only
		// a name (a mapping recorded before identities) asks for the name.
		s.reply(msg, UsersReply{Gone: true})
		return
	}
	users, err := Usage{SysRoot: s.cfg.SysRoot, ProcRoot: s.cfg.ProcRoot, Self: os.Getpid()}.Users(id.Name, req.Aliases...)
	if err != nil {
		s.reply(msg, UsersReply{Error: err.Error()})
		return
	}
	if len(users) > 0 {
		s.log.Info("disk in use", "device", d.Path, "users", commands.DeviceUsers(users))
	}
	s.reply(msg, UsersReply{Users: users})
}

// checkNames refuses a set with a name that is not volXXXXXXXX, a target
// that is not /dev/<kernel name>, or an identity of another kernel name.
func checkNames(names map[string]string, ids map[string]commands.DeviceIdentity) error {
	for name, target := range names {
		if err := checkName(name); err != nil {
			return err
		}
		dev, ok := strings.CutPrefix(target, "/dev/")
		if !ok || dev == "" || filepath.Clean(target) != target || strings.Contains(dev, "/") {
			return fmt.Errorf("devagent: target %q of %s is not /dev/<disk>", target, name)
		}
		if id, ok := ids[name]; ok && id.Path() != target {
			return fmt.Errorf("devagent: identity %s of %s is not of %s", id, name, target)
		}
	}
	return nil
}

// awaitAgent waits until the agent knows every present disk of targets as
// sysfs shows it: up to agentCatchUp for the uevents it has not handled
// yet, then, after asking it to rescan, up to agentCatchUp more. Only the
// agent's events change what it knows of a disk, each naming its disk:
// an event re-checks only the target it names.
func (s *Server) awaitAgent(ctx context.Context, targets map[string]string) {
	events, stop := s.cfg.Agent.Subscribe()
	defer stop()
	unknown := map[string]bool{} // the targets the agent does not know yet
	for _, target := range targets {
		if !s.agentKnows(target) {
			unknown[target] = true
		}
	}
	rescan := time.NewTimer(agentCatchUp)
	defer rescan.Stop()
	deadline := time.NewTimer(2 * agentCatchUp)
	defer deadline.Stop()
	for len(unknown) > 0 {
		select {
		case ev, open := <-events:
			if !open {
				return // the agent closed
			}
			if unknown[ev.Path] && s.agentKnows(ev.Path) {
				delete(unknown, ev.Path)
			}
		case <-rescan.C:
			s.cfg.Agent.requestScan()
		case <-deadline.C:
			return
		case <-ctx.Done():
			return
		}
	}
}

// agentKnows reports whether target is not a present disk, or is one the
// agent knows as sysfs shows it now.
func (s *Server) agentKnows(target string) bool {
	d, ok, err := s.sysfs.Disk(strings.TrimPrefix(target, "/dev/"))
	if err != nil || !ok {
		return true
	}
	_, known := s.known(d)
	return known
}

// known returns the agent's record of d, read from sysfs just now, if
// the agent knows that disk (and not an earlier one under its name).
func (s *Server) known(d commands.Device) (commands.Device, bool) {
	k, ok := s.cfg.Agent.Device(d.Name)
	return k, ok && !replaced(k, d)
}

// apply makes the names exactly want: each name whose target is a present
// disk that the agent knows, with the identity ids gives (if any) and not
// carrying another volume's kernel identity, is made (replacing one
// referring elsewhere); every other name is removed. A disk the agent does
// not know would never take its name with it: the agent emits no remove
// for it. The identity check alone does not suffice: a diskseq starts
// again at each boot, so a disk after a reboot may show the diskseq,
// name and number a mapping recorded for another volume's disk.
func (s *Server) apply(ctx context.Context, want map[string]string, ids map[string]commands.DeviceIdentity) NamesMessage {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := NamesMessage{Dir: s.cfg.Namer.Dir(), Skipped: map[string]string{}}
	if s.closed {
		out.Error = "devagent: server closed"
		return out
	}
	prev, err := s.cfg.Namer.List(ctx)
	if err != nil {
		out.Error = err.Error()
		return out
	}
	out.Previous = prev
	s.desired = map[string]commands.DeviceIdentity{}
	var errs []error
	for _, name := range slices.Sorted(maps.Keys(want)) {
		target := want[name]
		d, k, why := s.disk(target)
		id, checked := ids[name]
		switch {
		case why != "":
			out.Skipped[name] = why
		case checked && !s.sameDisk(id, d):
			out.Skipped[name] = fmt.Sprintf("%s is now disk %s, not %s", target, d.Identity(), id)
		case HasIdentity(d) && !carriesName(d, name):
			out.Skipped[name] = fmt.Sprintf("%s (disk %s) carries another volume's identity", target, k.Identity())
		default:
			if _, err := s.cfg.Namer.Ensure(ctx, name, target); err != nil {
				errs = append(errs, err)
				continue
			}
			s.desired[name] = k.Identity()
			continue
		}
		if err := s.cfg.Namer.Remove(ctx, name); err != nil {
			errs = append(errs, err)
		}
	}
	for name := range prev {
		if _, keep := want[name]; !keep {
			if err := s.cfg.Namer.Remove(ctx, name); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if out.Names, err = s.cfg.Namer.List(ctx); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		out.Error = err.Error()
	}
	if !maps.Equal(prev, out.Names) {
		s.log.Info("persistent names set", "names", out.Names, "skipped", out.Skipped)
	}
	return out
}

// sameDisk reports whether d, as read from sysfs now, is the disk of
// identity id. Without a kernel diskseq the agent's generation is not in
// sysfs: the disk the agent knows by that name must carry it.
func (s *Server) sameDisk(id commands.DeviceIdentity, d commands.Device) bool {
	if sysfsIdentity(d, id.Generation) != id {
		return false
	}
	if id.DiskSeq == 0 && id.Generation != 0 {
		known, ok := s.cfg.Agent.Device(d.Name)
		return ok && known.Generation == id.Generation
	}
	return true
}

// sysfsIdentity is the identity of d as read from sysfs, which knows no
// generation: the agent's, gen, is taken for it.
func sysfsIdentity(d commands.Device, gen uint64) commands.DeviceIdentity {
	id := d.Identity()
	id.Generation = gen
	return id
}

// inboxOnly wraps a request handler so that a request whose reply
// subject is not an inbox (bus.InboxReply) is refused and not acted on:
// in volumed the server answers with the daemon's identity, and an agent
// of the same VM may send it requests.
func (s *Server) inboxOnly(h nats.MsgHandler) nats.MsgHandler {
	return func(msg *nats.Msg) {
		if !bus.InboxReply(msg.Reply) {
			s.log.Warn("request refused: its reply subject is not an inbox", "subject", msg.Subject, "reply", msg.Reply)
			return
		}
		h(msg)
	}
}

// reply answers a request with v as JSON.
func (s *Server) reply(msg *nats.Msg, v any) {
	data, err := json.Marshal(v)
	if err != nil {
		s.log.Error("encode reply", "subject", msg.Subject, "err", err)
		return
	}
	if err := msg.Respond(data); err != nil {
		s.log.Warn("reply", "subject", msg.Subject, "err", err)
	}
}
