// Package nbd is volumed's NBD server: it serves each locally mapped volume
// as an export named by its persistent device name, speaking fixed newstyle
// negotiation (NBD_OPT_LIST, INFO, GO, EXPORT_NAME, STARTTLS,
// STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT with
// base:allocation) and the read, write, flush, trim, cache, write-zeroes,
// block-status and disconnect commands, several at once per connection
// with replies in any order, within bounds on connections and on the
// bytes of requests in flight. The served set
// is exactly the last one given to SetExports: a removed export refuses new
// clients at once, and its open connections and file descriptor are closed
// before SetExports returns.
package nbd

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"path/filepath"
	"regexp"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/volumed/volumed/internal/backoff"
)

// DefaultListen is the address volumed's --nbd-listen defaults to.
const DefaultListen = "127.0.0.1:10809"

// Defaults of the Config limits.
const (
	// DefaultHandshakeTimeout bounds the negotiation phase, TLS included.
	DefaultHandshakeTimeout = 10 * time.Second
	// DefaultWriteTimeout bounds the sending of one reply.
	DefaultWriteTimeout = 2 * time.Minute
	// DefaultMaxConns caps connections overall, negotiating ones included.
	DefaultMaxConns = 64
	// DefaultMaxConnsPerExport caps connections in transmission on one export.
	DefaultMaxConnsPerExport = 16
	// DefaultMaxBytesInFlight caps the request buffers of all connections,
	// beyond each connection's one-buffer floor.
	DefaultMaxBytesInFlight = 128 << 20
	// DefaultConnBytesInFlight caps the request buffers of one connection.
	DefaultConnBytesInFlight = 16 << 20
)

var (
	// ErrClosed reports a call on a closed Server.
	ErrClosed = errors.New("nbd: server closed")
	// ErrInvalidSpec reports an export spec SetExports refuses: a name not
	// matching NamePattern, a duplicate name or a relative path.
	ErrInvalidSpec = errors.New("nbd: invalid export spec")
)

// NamePattern is what an export name must match: a persistent device name,
// "vol" and the first 8 hex digits of the volume id.
var NamePattern = regexp.MustCompile(`^vol[0-9a-f]{8}$`)

// Config configures a Server.
type Config struct {
	// Listen is the TCP address to serve on; empty means DefaultListen.
	// The daemon creates no Server at all when --nbd-listen is empty.
	Listen string
	// HandshakeTimeout bounds negotiation; zero means
	// DefaultHandshakeTimeout.
	HandshakeTimeout time.Duration
	// WriteTimeout bounds each reply a client does not take in (a client
	// that sends requests and never reads): the connection is closed and
	// its slot on the export freed. Zero means DefaultWriteTimeout.
	WriteTimeout time.Duration
	// TLS, when set, is offered with NBD_OPT_STARTTLS (see TLSConfig).
	TLS *tls.Config
	// RequireTLS refuses every option but STARTTLS and ABORT before TLS
	// (NBD_REP_ERR_TLS_REQD); it needs TLS.
	RequireTLS bool
	// MaxConns, MaxConnsPerExport, MaxBytesInFlight and ConnBytesInFlight
	// are the limits; zero means the Default constants.
	MaxConns          int
	MaxConnsPerExport int
	MaxBytesInFlight  int64
	ConnBytesInFlight int64
	// Logger is the parent logger; nil means slog.Default().
	Logger *slog.Logger
}

// ExportSpec is one export SetExports is asked to serve.
type ExportSpec struct {
	// Name is the export name, the volume's persistent device name.
	Name string
	// Path is the absolute path of the block device or file backing it.
	Path string
	// ReadOnly opens Path read-only and refuses writes and trims with EPERM.
	ReadOnly bool
	// Device, when non-zero, is the device number (unix.Mkdev) Path must
	// be once opened: a block device with exactly this rdev, checked on
	// the open descriptor (ErrWrongDevice otherwise). Zero accepts any
	// block device or regular file.
	Device uint64
	// DiskSeq, when non-zero, is the kernel's diskseq the opened block
	// device must have (ioctl BLKGETDISKSEQ on the descriptor;
	// ErrWrongDevice otherwise), where the kernel has it (Linux 5.15 and
	// later). It tells apart the disks that reuse one device number, such
	// as a loop device bound to another file.
	DiskSeq uint64
	// Description is sent to clients asking NBD_INFO_DESCRIPTION.
	Description string
}

// ExportStatus is one served export and its connected clients.
type ExportStatus struct {
	// Name, Path and ReadOnly are as in the ExportSpec.
	Name     string
	Path     string
	ReadOnly bool
	// Clients counts connections in the transmission phase on this export.
	Clients int
}

// ExportError reports an export SetExports could not open; the others in
// the call are served.
type ExportError struct {
	// Name is the export that could not be opened.
	Name string
	// Err is why it could not be opened.
	Err error
}

var _ error = (*ExportError)(nil)

// Error implements error.
func (e *ExportError) Error() string { return fmt.Sprintf("nbd: export %s: %v", e.Name, e.Err) }

// Unwrap returns the cause.
func (e *ExportError) Unwrap() error { return e.Err }

// export is one served export. conns and removed are guarded by Server.mu.
type export struct {
	spec    ExportSpec
	b       *backing
	conns   map[*conn]struct{}
	removed bool
	done    chan struct{} // closed when removed and the fd is closed
}

// Server serves NBD exports. Create it with New.
type Server struct {
	cfg    Config
	log    *slog.Logger
	budget *budget

	setMu sync.Mutex // serialises SetExports and Close

	mu      sync.Mutex
	ln      net.Listener
	exports map[string]*export
	conns   map[*conn]struct{} // every open connection
	closed  bool

	wg sync.WaitGroup // accept loop and connection handlers
	// stopped ends with Close: the accept loop's pause between retries.
	stopped context.Context
	stop    context.CancelFunc

	stats counters // read by Stats
}

// counters are the server's totals since it started.
type counters struct{ conns, read, written atomic.Uint64 }

// Stats are a Server's counters, for monitoring.
type Stats struct {
	// Connections counts the connections open now; ConnectionsTotal every
	// connection accepted since the server started.
	Connections      int
	ConnectionsTotal uint64
	// BytesRead and BytesWritten count the payload bytes clients read and
	// wrote through every export since the server started.
	BytesRead, BytesWritten uint64
}

// Stats returns the server's counters.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	open := len(s.conns)
	s.mu.Unlock()
	return Stats{Connections: open, ConnectionsTotal: s.stats.conns.Load(),
		BytesRead: s.stats.read.Load(), BytesWritten: s.stats.written.Load()}
}

// New returns a Server for cfg, with defaults filled in. It serves nothing
// until Start.
func New(cfg Config) (*Server, error) {
	if cfg.Listen == "" {
		cfg.Listen = DefaultListen
	}
	if cfg.RequireTLS && cfg.TLS == nil {
		return nil, errors.New("nbd: RequireTLS without a TLS config")
	}
	cfg.HandshakeTimeout = cmp.Or(cfg.HandshakeTimeout, DefaultHandshakeTimeout)
	cfg.WriteTimeout = cmp.Or(cfg.WriteTimeout, DefaultWriteTimeout)
	cfg.MaxConns = cmp.Or(cfg.MaxConns, DefaultMaxConns)
	cfg.MaxConnsPerExport = cmp.Or(cfg.MaxConnsPerExport, DefaultMaxConnsPerExport)
	cfg.MaxBytesInFlight = cmp.Or(cfg.MaxBytesInFlight, DefaultMaxBytesInFlight)
	cfg.ConnBytesInFlight = cmp.Or(cfg.ConnBytesInFlight, DefaultConnBytesInFlight)
	if cfg.HandshakeTimeout < 0 || cfg.WriteTimeout < 0 || cfg.MaxConns < 0 || cfg.MaxConnsPerExport < 0 || cfg.MaxBytesInFlight < 0 ||
		cfg.ConnBytesInFlight < chunkSize {
		return nil, fmt.Errorf("nbd: negative limit, or ConnBytesInFlight under %d", chunkSize)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	stopped, stop := context.WithCancel(context.Background())
	return &Server{
		stopped: stopped,
		stop:    stop,
		cfg:     cfg,
		log:     cfg.Logger.With("component", "nbd"),
		budget:  newBudget(cfg.MaxBytesInFlight, cfg.ConnBytesInFlight),
		exports: map[string]*export{},
		conns:   map[*conn]struct{}{},
	}, nil
}

// Start listens on Config.Listen and accepts connections until Close. ctx
// bounds only the listen call.
func (s *Server) Start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	if s.ln != nil {
		return errors.New("nbd: already started")
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", s.cfg.Listen)
	if err != nil {
		return fmt.Errorf("nbd: listen: %w", err)
	}
	s.ln = ln
	s.wg.Add(1)
	go s.accept(ln)
	s.log.Info("nbd listening", "addr", ln.Addr().String())
	return nil
}

// Addr is the address the server listens on, nil before Start.
func (s *Server) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln == nil {
		return nil
	}
	return s.ln.Addr()
}

// Close stops listening, closes every connection and export file
// descriptor, and waits for the connection handlers until ctx ends.
// Closing twice is safe.
func (s *Server) Close(ctx context.Context) error {
	s.setMu.Lock()
	defer s.setMu.Unlock()
	s.mu.Lock()
	s.closed = true
	s.stop()
	var err error
	if s.ln != nil {
		if cerr := s.ln.Close(); cerr != nil && !errors.Is(cerr, net.ErrClosed) {
			err = fmt.Errorf("nbd: close listener: %w", cerr)
		}
	}
	removed := s.removeLocked(s.exports)
	for c := range s.conns {
		c.close()
	}
	s.mu.Unlock()

	waitErr := s.awaitRemoved(ctx, removed)
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		waitErr = errors.Join(waitErr, fmt.Errorf("nbd: connections still open: %w", ctx.Err()))
	}
	return errors.Join(err, waitErr)
}

// SetExports makes the served set exactly specs. New exports are served
// when it returns; removed ones, and ones whose Path or ReadOnly changed
// (a remove then an add), refuse new clients at once and have their
// connections and file descriptor closed before it returns, or an error
// when ctx ends first (a changed Device too). A changed Description alone keeps the export and
// its clients. An invalid spec (ErrInvalidSpec) changes nothing; an export
// that cannot be opened is left out and reported as an *ExportError while
// the rest of the set is applied.
func (s *Server) SetExports(ctx context.Context, specs []ExportSpec) error {
	if err := validate(specs); err != nil {
		return err
	}
	s.setMu.Lock()
	defer s.setMu.Unlock()

	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	want := make(map[string]ExportSpec, len(specs))
	for _, sp := range specs {
		want[sp.Name] = sp
	}
	gone := map[string]*export{}
	for name, e := range s.exports {
		if sp, ok := want[name]; !ok || sp.Path != e.spec.Path || sp.ReadOnly != e.spec.ReadOnly || sp.Device != e.spec.Device ||
			sp.DiskSeq != e.spec.DiskSeq {
			gone[name] = e
		}
	}
	var add []ExportSpec
	for _, sp := range specs {
		if e, ok := s.exports[sp.Name]; !ok || gone[sp.Name] != nil {
			add = append(add, sp)
		} else {
			e.spec.Description = sp.Description
		}
	}
	s.mu.Unlock()

	// Open outside the lock: a device may be slow to open. setMu keeps
	// the set from changing meanwhile.
	var errs []error
	opened := make([]*export, 0, len(add))
	for _, sp := range add {
		b, err := openBacking(sp)
		if err != nil {
			errs = append(errs, &ExportError{Name: sp.Name, Err: err})
			continue
		}
		opened = append(opened, &export{spec: sp, b: b, conns: map[*conn]struct{}{}, done: make(chan struct{})})
	}

	s.mu.Lock()
	removed := s.removeLocked(gone)
	for _, e := range opened {
		s.exports[e.spec.Name] = e
	}
	s.mu.Unlock()

	for _, e := range removed {
		s.log.Info("nbd export removed", "export", e.spec.Name, "path", e.spec.Path)
	}
	for _, e := range opened {
		s.log.Info("nbd export added", "export", e.spec.Name, "path", e.spec.Path,
			"read_only", e.spec.ReadOnly, "trim", e.b.trim)
	}
	return errors.Join(append(errs, s.awaitRemoved(ctx, removed))...)
}

// Remove stops serving the named export, as SetExports without it would.
// Removing an export that is not served is not an error.
func (s *Server) Remove(ctx context.Context, name string) error {
	s.setMu.Lock()
	s.mu.Lock()
	e, ok := s.exports[name]
	var removed []*export
	if ok {
		removed = s.removeLocked(map[string]*export{name: e})
	}
	s.mu.Unlock()
	s.setMu.Unlock()
	return s.awaitRemoved(ctx, removed)
}

// Exports lists the served exports sorted by name.
func (s *Server) Exports() []ExportStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]ExportStatus, 0, len(s.exports))
	for _, e := range s.sortedLocked() {
		out = append(out, ExportStatus{Name: e.spec.Name, Path: e.spec.Path, ReadOnly: e.spec.ReadOnly, Clients: len(e.conns)})
	}
	return out
}

// sortedLocked is the served exports sorted by name. s.mu is held.
func (s *Server) sortedLocked() []*export {
	out := slices.Collect(maps.Values(s.exports))
	slices.SortFunc(out, func(a, b *export) int { return cmp.Compare(a.spec.Name, b.spec.Name) })
	return out
}

// removeLocked takes the exports out of the served set, closes their
// connections, and releases those without any. s.mu is held.
func (s *Server) removeLocked(gone map[string]*export) []*export {
	out := make([]*export, 0, len(gone))
	for name, e := range gone {
		delete(s.exports, name)
		e.removed = true
		for c := range e.conns {
			c.close()
		}
		if len(e.conns) == 0 {
			s.release(e)
		}
		out = append(out, e)
	}
	return out
}

// release closes the export's file descriptor; called exactly once, when
// it is removed and has no connections.
func (s *Server) release(e *export) {
	if err := e.b.close(); err != nil {
		s.log.Warn("nbd close export", "export", e.spec.Name, "err", err)
	}
	close(e.done)
}

// awaitRemoved waits until every removed export has released its fd.
func (s *Server) awaitRemoved(ctx context.Context, removed []*export) error {
	for _, e := range removed {
		select {
		case <-e.done:
		case <-ctx.Done():
			return fmt.Errorf("nbd: export %s: connections still open: %w", e.spec.Name, ctx.Err())
		}
	}
	return nil
}

// errTooManyClients reports an export at MaxConnsPerExport.
var errTooManyClients = errors.New("nbd: too many clients on this export")

// find returns the named export and a snapshot of its spec, nil when it is
// not served. With attach, c is bound to it for transmission (c.exp), or
// errTooManyClients when the export has MaxConnsPerExport already.
func (s *Server) find(c *conn, name string, attach bool) (*export, ExportSpec, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.exports[name]
	if !ok {
		return nil, ExportSpec{}, nil
	}
	if attach {
		if len(e.conns) >= s.cfg.MaxConnsPerExport {
			return nil, ExportSpec{}, errTooManyClients
		}
		e.conns[c] = struct{}{}
		c.exp = e
	}
	return e, e.spec, nil
}

// specs lists the served exports' specs sorted by name.
func (s *Server) specs() []ExportSpec {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]ExportSpec, 0, len(s.exports))
	for _, e := range s.sortedLocked() {
		out = append(out, e.spec)
	}
	return out
}

// acceptBackoff spaces the retries of a failing accept.
var acceptBackoff = backoff.Policy{Min: 5 * time.Millisecond, Max: time.Second}

// accept runs the accept loop until the listener is closed. A failed
// accept (out of file descriptors: EMFILE, ENFILE) is retried after a
// pause, as net/http does, so the server serves again once descriptors
// are free.
func (s *Server) accept(ln net.Listener) {
	defer s.wg.Done()
	retry := acceptBackoff.Start()
	for {
		nc, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			d := retry.Next()
			s.log.Error("nbd accept failed, retrying", "err", err, "retry_in", d)
			if !backoff.Sleep(s.stopped, d) {
				return
			}
			continue
		}
		retry.Reset()
		c := newConn(s, nc)
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			nc.Close()
			return
		}
		if len(s.conns) >= s.cfg.MaxConns {
			s.mu.Unlock()
			s.log.Warn("nbd connection refused: too many connections", "remote", nc.RemoteAddr().String(), "max", s.cfg.MaxConns)
			nc.Close()
			continue
		}
		s.conns[c] = struct{}{}
		s.stats.conns.Add(1)
		s.wg.Add(1)
		s.mu.Unlock()
		go c.serve()
	}
}

// forget drops a finished connection, releasing its export if that was
// removed and this was its last connection.
func (s *Server) forget(c *conn) {
	s.mu.Lock()
	delete(s.conns, c)
	e := c.exp
	last := false
	if e != nil {
		delete(e.conns, c)
		last = e.removed && len(e.conns) == 0
	}
	s.mu.Unlock()
	if last {
		s.release(e)
	}
}

// validate checks names, duplicates and paths.
func validate(specs []ExportSpec) error {
	seen := make(map[string]bool, len(specs))
	for _, sp := range specs {
		switch {
		case !NamePattern.MatchString(sp.Name):
			return fmt.Errorf("%w: name %q does not match %s", ErrInvalidSpec, sp.Name, NamePattern)
		case seen[sp.Name]:
			return fmt.Errorf("%w: duplicate name %q", ErrInvalidSpec, sp.Name)
		case !filepath.IsAbs(sp.Path):
			return fmt.Errorf("%w: %s: path %q is not absolute", ErrInvalidSpec, sp.Name, sp.Path)
		}
		seen[sp.Name] = true
	}
	return nil
}
