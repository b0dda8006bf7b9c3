// Package bus carries volumed's messages: it runs the embedded NATS server
// with JetStream (or connects to an external NATS cluster), connects to it,
// and creates the streams the daemon needs, idempotently, at start.
package bus

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strconv"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/formation"
	"github.com/volumed/volumed/internal/lifecycle"
)

// Streams and internal subjects.
const (
	// StreamJobs is the durable work queue of accepted commands, one
	// message per operation on volumed.jobs.<line>.<operation_id>: the
	// line is the volume's id (a create's own operation id), and a job
	// runs when it is the first message left on its line. An operation on
	// several volumes has one message on each of their lines, published
	// as one atomic batch (the stream allows atomic publish). With one
	// replica it allows direct gets (the only server holding it answers
	// them, as fresh as its leader's API); with more it does not, so that
	// no follower answers a read of the queue.
	StreamJobs = "VOLUMED_JOBS"
	// JobsSubjectPrefix prefixes the job subjects.
	JobsSubjectPrefix = "volumed.jobs."
	// StreamOps keeps every operation event (volumes.ops.>).
	StreamOps = "VOLUMED_OPS"
	// StreamDevices keeps every device event (devices.<vm_id>.add|remove|change);
	// the agents' request subjects (devices.<vm_id>.list|names) stay out.
	StreamDevices = "VOLUMED_DEVICES"
)

// Subjects of the event streams, from the public contract's (commands):
// opsSubject for StreamOps, deviceEventSubjects for StreamDevices.
var (
	opsSubject          = commands.SubjectOpsPrefix + ">"
	deviceEventSubjects = []string{commands.DeviceSubject("*", commands.DeviceAdd),
		commands.DeviceSubject("*", commands.DeviceRemove), commands.DeviceSubject("*", commands.DeviceChange)}
)

// DefaultListen is where the embedded server listens without a config file.
const DefaultListen = "127.0.0.1:4222"

// DefaultMaxConns caps the embedded server's client connections (volumed's
// own included) when its config sets no max_connections: over it a client
// gets "-ERR 'maximum connections exceeded'" and is closed at once, so a
// flood of connections holds a bounded number of file descriptors.
const DefaultMaxConns = 1024

// Config configures a Bus. The zero value runs an embedded server on
// DefaultListen with JetStream under the working directory.
type Config struct {
	// URL of an external NATS server or cluster, several comma-separated
	// for a cluster (the client fails over between them); "" runs the
	// embedded one.
	URL string
	// ConfigFile is the embedded server's nats.conf; "" uses built-in defaults.
	ConfigFile string
	// Listen overrides the embedded server's host:port; port 0 picks a free one.
	Listen string
	// DataDir holds the embedded server's JetStream files (DataDir/nats)
	// unless the config file sets store_dir.
	DataDir string
	// Replicas of every stream (and of the state bucket); default 1.
	Replicas int
	// OpsMaxAge is how long operation events are kept; default 7 days.
	OpsMaxAge time.Duration
	// DevicesMaxAge is how long device events are kept; default 24 hours.
	DevicesMaxAge time.Duration
	// ClientOnly connects without creating or updating any stream, for a
	// process that only uses the streams volumed made (a device agent).
	ClientOnly bool
	// Name is the client connection name; default "volumed".
	Name string
	// CredsDir holds the embedded server's keys and the role credentials
	// (see Authority); default DataDir/creds.
	CredsDir string
	// Creds is the credentials file to connect to an external URL with;
	// the embedded server is reached with the daemon's own.
	Creds string
	// ServiceCreds is the credentials file the command service connects
	// to an external URL with: the service role's (service.creds of the
	// authority the server trusts, `volumed creds server-config`). Empty,
	// the service answers on the daemon's connection. The embedded server
	// is reached with the service role's own.
	ServiceCreds string
	// InboxPrefix is the connection's inbox prefix; default one only the
	// daemon may subscribe to (_INBOX for a ClientOnly bus).
	InboxPrefix string
	// TLS of the embedded server and of the connection (tls.go); without
	// it the embedded server must listen on loopback.
	TLS TLS
	// Logger is the parent logger; default slog.Default().
	Logger *slog.Logger
}

// Bounds of the publishes whose ack is not waited for (PublishAsync): at
// most asyncMaxPending unacknowledged at once, each failed after
// asyncAckTimeout without an ack.
const (
	asyncMaxPending = 4096
	asyncAckTimeout = 5 * time.Second
)

// Bus is a running connection to NATS, with the embedded server if any.
type Bus struct {
	cfg    Config
	log    *slog.Logger
	srv    *server.Server
	nc     *nats.Conn
	svc    *nats.Conn // ServiceConn; nil without RoleService's credentials
	js     jetstream.JetStream
	closer lifecycle.Stopper
}

// New returns a Bus with defaults filled in; Start connects it.
func New(cfg Config) *Bus {
	if cfg.Replicas <= 0 {
		cfg.Replicas = 1
	}
	if cfg.OpsMaxAge <= 0 {
		cfg.OpsMaxAge = 7 * 24 * time.Hour
	}
	if cfg.DevicesMaxAge <= 0 {
		cfg.DevicesMaxAge = 24 * time.Hour
	}
	if cfg.Name == "" {
		cfg.Name = "volumed"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.CredsDir == "" {
		cfg.CredsDir = filepath.Join(cfg.DataDir, "creds")
	}
	return &Bus{cfg: cfg, log: cfg.Logger.With("component", "bus")}
}

// Start runs the embedded server when no URL is configured, connects, and
// creates or updates the streams.
func (b *Bus) Start(ctx context.Context) error {
	url := b.cfg.URL
	if url == "" {
		srv, err := b.startEmbedded(ctx)
		if err != nil {
			return err
		}
		b.srv = srv
		url = connectURL(srv)
	}
	opts := append(b.authOptions(), nats.Name(b.cfg.Name), nats.MaxReconnects(-1),
		nats.ReconnectWait(250*time.Millisecond), nats.Timeout(5*time.Second))
	dial := url
	if b.srv != nil {
		// The embedded server is reached in process: no socket, and no
		// TLS to encrypt and decrypt every message with (the server does
		// not ask it of an in-process client; a tls:// URL would).
		dial = nats.DefaultURL
		opts = append(opts, nats.InProcessServer(b.srv))
	} else {
		opts = append(opts, b.tlsOption())
	}
	nc, err := nats.Connect(dial, opts...)
	if err != nil {
		b.shutdownServer()
		return fmt.Errorf("bus: connect %s: %w", url, err)
	}
	b.nc = nc
	if err := b.connectService(dial, url); err != nil {
		b.closeAll()
		return err
	}
	if b.js, err = jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(asyncMaxPending),
		jetstream.WithPublishAsyncTimeout(asyncAckTimeout),
		jetstream.WithPublishAsyncErrHandler(func(_ jetstream.JetStream, msg *nats.Msg, err error) {
			b.log.Warn("asynchronous publish not stored", "subject", msg.Subject, "err", err)
		})); err != nil {
		b.closeAll()
		return fmt.Errorf("bus: jetstream: %w", err)
	}
	if !b.cfg.ClientOnly {
		if err := b.ensureStreams(ctx); err != nil {
			b.closeAll()
			return err
		}
	}
	b.log.Info("bus ready", "url", url, "embedded", b.srv != nil, "replicas", b.cfg.Replicas)
	return nil
}

func (b *Bus) startEmbedded(ctx context.Context) (*server.Server, error) {
	opts := &server.Options{Host: "127.0.0.1", Port: 4222}
	if b.cfg.ConfigFile != "" {
		fileOpts, err := server.ProcessConfigFile(b.cfg.ConfigFile)
		if err != nil {
			return nil, fmt.Errorf("bus: nats config %s: %w", b.cfg.ConfigFile, err)
		}
		opts = fileOpts
	}
	if err := b.configureAuth(opts); err != nil {
		return nil, err
	}
	if b.cfg.Listen != "" {
		host, port, err := net.SplitHostPort(b.cfg.Listen)
		if err != nil {
			return nil, fmt.Errorf("bus: listen %q: %w", b.cfg.Listen, err)
		}
		p, err := strconv.Atoi(port)
		if err != nil {
			return nil, fmt.Errorf("bus: listen port %q: %w", port, err)
		}
		if p == 0 {
			p = server.RANDOM_PORT
		}
		opts.Host, opts.Port = host, p
	}
	if opts.MaxConn == 0 {
		opts.MaxConn = DefaultMaxConns
	}
	opts.JetStream = true
	if opts.StoreDir == "" {
		opts.StoreDir = filepath.Join(b.cfg.DataDir, "nats")
	}
	if opts.ServerName == "" {
		if opts.Cluster.Port != 0 {
			// JetStream tells the members of a cluster apart by name.
			return nil, fmt.Errorf("bus: nats config %s: a cluster {} needs a server_name unique to this server", b.cfg.ConfigFile)
		}
		opts.ServerName = "volumed"
	}
	if err := b.configureTLS(opts); err != nil {
		return nil, err
	}
	if err := b.upgradeStore(ctx, opts); err != nil {
		return nil, err
	}
	opts.NoSigs = true
	srv, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("bus: embedded server: %w", err)
	}
	srv.SetLoggerV2(&natsLogger{log: b.log.With("component", "nats-server")}, false, false, false)
	srv.Start()
	if !srv.ReadyForConnections(15 * time.Second) {
		srv.Shutdown()
		return nil, fmt.Errorf("bus: embedded server on %s:%d not ready", opts.Host, opts.Port)
	}
	return srv, nil
}

// ensureStreams makes or updates the bus's streams. On a cluster still
// forming (its members start one by one) there are not yet enough servers
// for the replicas: each request is asked again as formation.Wait does,
// for as long as its error is one formation.Transient says passes;
// ensureStreams waits formation.Budget for them all.
func (b *Bus) ensureStreams(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, formation.Budget)
	defer cancel()
	streams := []jetstream.StreamConfig{
		{Name: StreamJobs, Subjects: []string{JobsSubjectPrefix + ">"}, Retention: jetstream.WorkQueuePolicy,
			Storage: jetstream.FileStorage, Replicas: b.cfg.Replicas, Duplicates: 2 * time.Minute,
			AllowAtomicPublish: true, AllowDirect: b.cfg.Replicas == 1, Description: "volumed accepted commands awaiting execution"},
		{Name: StreamOps, Subjects: []string{opsSubject}, Retention: jetstream.LimitsPolicy,
			Storage: jetstream.FileStorage, Replicas: b.cfg.Replicas, MaxAge: b.cfg.OpsMaxAge,
			Description: "volumed operation events"},
		{Name: StreamDevices, Subjects: deviceEventSubjects, Retention: jetstream.LimitsPolicy,
			Storage: jetstream.FileStorage, Replicas: b.cfg.Replicas, MaxAge: b.cfg.DevicesMaxAge,
			Description: "volumed block device events"},
	}
	for _, sc := range streams {
		var stream jetstream.Stream
		err := formation.Wait(ctx, b.log, "stream "+sc.Name, func(ctx context.Context) error {
			var err error
			stream, err = b.js.CreateOrUpdateStream(ctx, sc)
			return err
		})
		if err != nil {
			return fmt.Errorf("bus: stream %s: %w", sc.Name, err)
		}
		if sc.AllowAtomicPublish && !stream.CachedInfo().Config.AllowAtomicPublish {
			// A NATS server before 2.12 ignores the setting.
			b.log.Warn("the NATS server does not take atomic batches (it needs 2.12 or later): operations on several volumes are refused",
				"stream", sc.Name)
		}
	}
	return nil
}

// Conn is the NATS connection.
func (b *Bus) Conn() *nats.Conn { return b.nc }

// connectService connects the command service with RoleService's
// credentials: the embedded server's, or Config.ServiceCreds on an
// external one. A ClientOnly bus, or an external one without
// ServiceCreds, has none.
func (b *Bus) connectService(dial, url string) error {
	opts := []nats.Option{nats.Name(b.cfg.Name + "-service"), nats.MaxReconnects(-1),
		nats.ReconnectWait(250 * time.Millisecond), nats.Timeout(5 * time.Second),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			b.log.Warn("command service connection", "err", err)
		})}
	switch {
	case b.cfg.ClientOnly:
		return nil
	case b.srv != nil:
		opts = append(opts, nats.InProcessServer(b.srv), nats.UserCredentials(CredsFile(b.cfg.CredsDir, RoleService)))
	case b.cfg.ServiceCreds != "":
		opts = append(opts, b.tlsOption(), nats.UserCredentials(b.cfg.ServiceCreds))
	default:
		return nil
	}
	svc, err := nats.Connect(dial, opts...)
	if err != nil {
		return fmt.Errorf("bus: connect the command service to %s: %w", url, err)
	}
	b.svc = svc
	return nil
}

// ServiceConn is the connection the command service takes requests on and
// answers them: one of RoleService, which may publish only on inboxes
// (connectService); without one, Conn.
func (b *Bus) ServiceConn() *nats.Conn {
	if b.svc != nil {
		return b.svc
	}
	return b.nc
}

// JetStream is the JetStream context of the connection.
func (b *Bus) JetStream() jetstream.JetStream { return b.js }

// ClientURL is the URL other processes use to reach the bus.
func (b *Bus) ClientURL() string {
	if b.srv != nil {
		return b.srv.ClientURL()
	}
	return b.cfg.URL
}

// Embedded reports whether the bus runs its own server.
func (b *Bus) Embedded() bool { return b.srv != nil }

// Ping checks the connection round trip.
func (b *Bus) Ping(ctx context.Context) error {
	if b.nc == nil {
		return errors.New("bus: not started")
	}
	deadline, ok := ctx.Deadline()
	timeout := 2 * time.Second
	if ok {
		timeout = time.Until(deadline)
	}
	return b.nc.FlushTimeout(timeout)
}

// Close closes the connection and shuts the embedded server down. Closing
// twice is safe.
func (b *Bus) Close(ctx context.Context) error {
	if err := b.closer.Close(ctx, b.closeAll); err != nil {
		return fmt.Errorf("bus: close: %w", err)
	}
	return nil
}

func (b *Bus) closeAll() {
	if b.svc != nil {
		b.svc.Close()
	}
	if b.nc != nil {
		b.nc.Close()
	}
	b.shutdownServer()
}

func (b *Bus) shutdownServer() {
	if b.srv != nil {
		b.srv.Shutdown()
		b.srv.WaitForShutdown()
	}
}

// natsLogger routes the embedded server's log to slog.
type natsLogger struct{ log *slog.Logger }

var _ server.Logger = (*natsLogger)(nil)

func (l *natsLogger) Noticef(format string, v ...any) { l.log.Debug(fmt.Sprintf(format, v...)) }
func (l *natsLogger) Warnf(format string, v ...any)   { l.log.Warn(fmt.Sprintf(format, v...)) }
func (l *natsLogger) Fatalf(format string, v ...any)  { l.log.Error(fmt.Sprintf(format, v...)) }
func (l *natsLogger) Errorf(format string, v ...any)  { l.log.Error(fmt.Sprintf(format, v...)) }
func (l *natsLogger) Debugf(format string, v ...any)  { l.log.Debug(fmt.Sprintf(format, v...)) }
func (l *natsLogger) Tracef(format string, v ...any)  { l.log.Debug(fmt.Sprintf(format, v...)) }
