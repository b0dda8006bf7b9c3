package httpbridge

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"golang.org/x/net/netutil"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/netaddr"
	"github.com/volumed/volumed/state"
)

// Defaults of Config.
const (
	DefaultListen       = "127.0.0.1:8090"
	DefaultQueryTimeout = 15 * time.Second
	DefaultMaxWait      = 5 * time.Minute
	// DefaultReadHeaderTimeout, DefaultReadTimeout and DefaultIdleTimeout
	// bound a request's headers, a whole request, and an idle keep-alive
	// connection.
	DefaultReadHeaderTimeout = 10 * time.Second
	DefaultReadTimeout       = 30 * time.Second
	DefaultIdleTimeout       = 2 * time.Minute
	// DefaultMaxConns caps the connections served at once.
	DefaultMaxConns = 1024
	// writeSlack is added to the longest answer (a ?wait, a force-sync)
	// to make the write timeout.
	writeSlack = 30 * time.Second
)

// BasePath prefixes every route.
const BasePath = "/api/v1"

// Config configures a Server.
type Config struct {
	// Listen is the host:port to serve on; default DefaultListen. Port 0
	// picks a free port (see Server.Addr).
	Listen string
	// Conn carries the operation events a wait follows when the Store
	// does not tell of ends in process (state.OperationEnds); required.
	Conn *nats.Conn
	// Commands runs the commands; required.
	Commands Commands
	// Store answers operation and mapping reads; required.
	Store state.Store
	// Backend answers volume, VM, health and metrics reads; required.
	Backend Backend
	// VMID is the VM volumed runs on: GET /devices/{device_path}/volume
	// names its devices unless ?vm_id says otherwise.
	VMID string
	// QueryTimeout bounds one read (the store, the Backend, the flush
	// before a wait); default DefaultQueryTimeout. Commands are bounded by
	// the command service.
	QueryTimeout time.Duration
	// MaxWait caps the ?wait of GET /operations/{id}; default DefaultMaxWait.
	MaxWait time.Duration
	// Token is the API bearer token, named DefaultTokenName. Off loopback
	// a token is required on every route but /health and /openapi.json,
	// and Start refuses to listen off loopback without one; on loopback a
	// request may omit it.
	Token string
	// Tokens are named tokens besides Token, replaced whole on a reload.
	Tokens *Tokens
	// TLS serves HTTPS when set (its certificate callbacks give the
	// current certificate). Off loopback Start refuses to serve without.
	TLS *tls.Config
	// ReadHeaderTimeout, ReadTimeout and IdleTimeout of the HTTP server;
	// defaults DefaultReadHeaderTimeout, DefaultReadTimeout and
	// DefaultIdleTimeout. The write timeout is the longest answer
	// (MaxWait, a force-sync, a command, QueryTimeout) plus 30 s.
	ReadHeaderTimeout, ReadTimeout, IdleTimeout time.Duration
	// MaxConns caps the connections served at once (long polls and idle
	// keep-alives included); default DefaultMaxConns. More wait in the
	// kernel's listen queue, holding no file descriptor of volumed's,
	// until one closes.
	MaxConns int
	// Logger is the parent of the bridge's logger; default slog.Default().
	Logger *slog.Logger
	// Prometheus serves GET /metrics (outside BasePath) when not nil.
	Prometheus http.Handler
}

// Server is the REST bridge.
type Server struct {
	cfg     Config
	log     *slog.Logger
	handler http.Handler
	// requireToken: the bridge listens off loopback.
	requireToken bool
	// closing is closed by Close so long polls answer at once.
	closing chan struct{}

	mu      sync.Mutex
	srv     *http.Server
	ln      net.Listener
	served  chan struct{}
	closeMu sync.Once
}

// New returns a Server with defaults filled in; Start serves it.
func New(cfg Config) *Server {
	if cfg.Listen == "" {
		cfg.Listen = DefaultListen
	}
	if cfg.QueryTimeout <= 0 {
		cfg.QueryTimeout = DefaultQueryTimeout
	}
	if cfg.MaxWait <= 0 {
		cfg.MaxWait = DefaultMaxWait
	}
	if cfg.ReadHeaderTimeout <= 0 {
		cfg.ReadHeaderTimeout = DefaultReadHeaderTimeout
	}
	if cfg.ReadTimeout <= 0 {
		cfg.ReadTimeout = DefaultReadTimeout
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = DefaultMaxConns
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	s := &Server{cfg: cfg, log: cfg.Logger.With("component", "httpbridge"), closing: make(chan struct{}),
		requireToken: !netaddr.IsLoopback(cfg.Listen)}
	s.handler = s.routes()
	return s
}

// Handler is the whole REST surface, for tests and embedding.
func (s *Server) Handler() http.Handler { return s.handler }

// Start listens on Config.Listen and serves in the background until Close.
func (s *Server) Start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srv != nil {
		return errors.New("httpbridge: already started")
	}
	select {
	case <-s.closing:
		return errors.New("httpbridge: closed")
	default:
	}
	if err := CheckToken(s.cfg.Token); s.requireToken && err != nil && (s.cfg.Tokens == nil || s.cfg.Tokens.Len() == 0) {
		return fmt.Errorf("httpbridge: refusing to listen on %s, off loopback: %w", s.cfg.Listen, err)
	}
	if s.requireToken && s.cfg.TLS == nil {
		return fmt.Errorf("httpbridge: refusing to listen on %s, off loopback: %w", s.cfg.Listen, ErrPlainOffLoopback)
	}
	if s.cfg.Conn == nil || s.cfg.Commands == nil || s.cfg.Store == nil || s.cfg.Backend == nil {
		return errors.New("httpbridge: Conn, Commands, Store and Backend are required")
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", s.cfg.Listen)
	if err != nil {
		return fmt.Errorf("httpbridge: listen %s: %w", s.cfg.Listen, err)
	}
	ln = netutil.LimitListener(ln, s.cfg.MaxConns)
	s.ln = ln
	s.srv = &http.Server{
		Handler:           s.handler,
		ReadHeaderTimeout: s.cfg.ReadHeaderTimeout,
		ReadTimeout:       s.cfg.ReadTimeout,
		WriteTimeout:      max(s.cfg.MaxWait, commands.ForceSyncTimeout, commands.AcceptTimeout, s.cfg.QueryTimeout) + writeSlack,
		IdleTimeout:       s.cfg.IdleTimeout,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
	s.served = make(chan struct{})
	go func() {
		defer close(s.served)
		serve := s.srv.Serve
		if s.cfg.TLS != nil {
			// ServeTLS offers HTTP/2; a plain request gets a 400.
			s.srv.TLSConfig = s.cfg.TLS
			serve = func(ln net.Listener) error { return s.srv.ServeTLS(ln, "", "") }
		}
		if err := serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("serve failed", "err", err)
		}
	}()
	s.log.Info("listening", "addr", ln.Addr().String(), "token_required", s.requireToken, "https", s.cfg.TLS != nil)
	return nil
}

// ErrPlainOffLoopback is Start's refusal to serve plain HTTP off loopback.
var ErrPlainOffLoopback = errors.New("plain HTTP is refused off loopback: serve HTTPS (Config.TLS)")

// URL is the API's base URL once started (http or https), "" before.
func (s *Server) URL() string {
	addr := s.Addr()
	if addr == "" {
		return ""
	}
	if s.cfg.TLS != nil {
		return "https://" + addr + BasePath
	}
	return "http://" + addr + BasePath
}

// Addr is the bound address once started, "" before.
func (s *Server) Addr() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln == nil {
		return ""
	}
	return s.ln.Addr().String()
}

// Close answers pending long polls, shuts the server down gracefully
// within ctx and waits for it. Closing twice is safe.
func (s *Server) Close(ctx context.Context) error {
	var err error
	s.closeMu.Do(func() {
		close(s.closing)
		s.mu.Lock()
		srv, served := s.srv, s.served
		s.mu.Unlock()
		if srv == nil {
			return
		}
		if err = srv.Shutdown(ctx); err != nil {
			err = fmt.Errorf("httpbridge: shutdown: %w", err)
			_ = srv.Close()
		}
		<-served
	})
	return err
}
