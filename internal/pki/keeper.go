package pki

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/internal/lifecycle"
)

// Issuer issues certificates; *CA is one.
type Issuer interface {
	Issue(name string, hosts []string, lifetime time.Duration) (tls.Certificate, error)
}

var _ Issuer = (*CA)(nil)

// DefaultPollInterval is how often a Keeper of the user's files looks
// whether they changed.
const DefaultPollInterval = 5 * time.Second

// KeeperConfig configures a Keeper: either Issuer (volumed's certificates)
// or CertFile and KeyFile (the user's).
type KeeperConfig struct {
	// Issuer, Name, Hosts and Lifetime: the certificate is issued by
	// Issuer and renewed at two thirds of Lifetime (default DefaultLifetime).
	Issuer   Issuer
	Name     string
	Hosts    []string
	Lifetime time.Duration
	// WriteCert and WriteKey, when set, receive every issued certificate
	// (PEM, the key 0600), for a program that reads files (qemu, nbdkit).
	WriteCert, WriteKey string
	// CertFile and KeyFile are the user's; they are read again when
	// Reload is called (SIGHUP) or when they change (polled every
	// PollInterval, default DefaultPollInterval).
	CertFile, KeyFile string
	PollInterval      time.Duration
	// Logger is the parent logger; default slog.Default().
	Logger *slog.Logger
}

// Keeper holds a current certificate: issued and renewed before it
// expires, or the user's, reloaded when changed. Its tls.Config callbacks
// return the current one, so new handshakes take a renewed certificate
// and established connections go on.
type Keeper struct {
	cfg  KeeperConfig
	log  *slog.Logger
	stop lifecycle.Stopper

	mu      sync.Mutex
	cert    *tls.Certificate
	renewAt time.Time
	// files are the user's files as last loaded.
	files   []byte
	cancel  context.CancelFunc
	done    chan struct{}
	started bool
	closed  bool
}

// NewKeeper validates cfg; Start loads or issues the first certificate.
func NewKeeper(cfg KeeperConfig) (*Keeper, error) {
	switch {
	case cfg.Issuer != nil && cfg.CertFile != "":
		return nil, errors.New("pki: a keeper issues or loads files, not both")
	case cfg.Issuer == nil && (cfg.CertFile == "" || cfg.KeyFile == ""):
		return nil, errors.New("pki: a keeper needs an issuer, or a certificate and a key file")
	}
	if cfg.Lifetime <= 0 {
		cfg.Lifetime = DefaultLifetime
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = DefaultPollInterval
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Keeper{cfg: cfg, log: cfg.Logger.With("component", "pki", "cert", cfg.Name+cfg.CertFile)}, nil
}

// Start obtains the first certificate, then renews or watches it in the
// background until Close. A keeper starts once, and not after Close.
func (k *Keeper) Start(ctx context.Context) error {
	k.mu.Lock()
	started := k.started
	k.started = true
	k.mu.Unlock()
	if started {
		return errors.New("pki: keeper already started or closed")
	}
	if err := k.refresh(true); err != nil {
		return err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		return errors.New("pki: keeper closed")
	}
	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	k.cancel, k.done = cancel, make(chan struct{})
	go k.run(runCtx)
	return nil
}

// run renews the issued certificate at its time, or polls the files.
func (k *Keeper) run(ctx context.Context) {
	defer close(k.done)
	for {
		wait := k.cfg.PollInterval
		if k.cfg.Issuer != nil {
			k.mu.Lock()
			wait = time.Until(k.renewAt)
			k.mu.Unlock()
		}
		t := time.NewTimer(max(wait, 0))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		if err := k.refresh(false); err != nil {
			// The current certificate stays; try again soon.
			k.log.Error("certificate not renewed", "err", err)
			k.mu.Lock()
			k.renewAt = time.Now().Add(min(k.cfg.Lifetime/10, time.Minute))
			k.mu.Unlock()
		}
	}
}

// Reload reads the user's files again now (SIGHUP); with an issuer it
// does nothing.
func (k *Keeper) Reload() error {
	if k.cfg.Issuer != nil {
		return nil
	}
	return k.refresh(true)
}

// refresh issues a new certificate, or loads the files if they changed
// (always when force).
func (k *Keeper) refresh(force bool) error {
	if k.cfg.Issuer != nil {
		c, err := k.cfg.Issuer.Issue(k.cfg.Name, k.cfg.Hosts, k.cfg.Lifetime)
		if err != nil {
			return err
		}
		if err := k.write(c); err != nil {
			return err
		}
		k.mu.Lock()
		k.cert, k.renewAt = &c, time.Now().Add(k.cfg.Lifetime*2/3)
		k.mu.Unlock()
		k.log.Debug("certificate issued", "not_after", c.Leaf.NotAfter)
		return nil
	}
	certPEM, err := os.ReadFile(k.cfg.CertFile)
	if err != nil {
		return fmt.Errorf("pki: --tls-cert: %w", err)
	}
	keyPEM, err := os.ReadFile(k.cfg.KeyFile)
	if err != nil {
		return fmt.Errorf("pki: --tls-key: %w", err)
	}
	both := append(append([]byte{}, certPEM...), keyPEM...)
	k.mu.Lock()
	same := bytes.Equal(both, k.files)
	k.mu.Unlock()
	if same && !force {
		return nil
	}
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		// Half-written files (a certificate of the new key, the old key):
		// kept until they make a pair.
		return fmt.Errorf("pki: %s, %s: %w", k.cfg.CertFile, k.cfg.KeyFile, err)
	}
	k.mu.Lock()
	k.cert, k.files = &c, both
	k.mu.Unlock()
	k.log.Info("certificate loaded", "file", k.cfg.CertFile, "not_after", c.Leaf.NotAfter)
	return nil
}

// write saves an issued certificate to WriteCert and WriteKey.
func (k *Keeper) write(c tls.Certificate) error {
	if k.cfg.WriteCert == "" {
		return nil
	}
	certPEM, keyPEM, err := EncodePair(c)
	if err != nil {
		return err
	}
	if err := bus.WriteSecret(k.cfg.WriteKey, keyPEM, false); err != nil {
		return err
	}
	return writePublic(k.cfg.WriteCert, certPEM, false)
}

// Current is the certificate to present now.
func (k *Keeper) Current() *tls.Certificate {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.cert
}

// Close stops the renewals. Closing twice is safe.
func (k *Keeper) Close(ctx context.Context) error {
	return k.stop.Close(ctx, func() {
		k.mu.Lock()
		cancel, done := k.cancel, k.done
		k.started, k.closed = true, true // no renewals after Close
		k.mu.Unlock()
		if cancel != nil {
			cancel()
			<-done
		}
	})
}

// Trust is what a TLS endpoint presents and what it trusts: the Keeper's
// current certificate and the CA pool (volumed's CA or --tls-ca).
type Trust struct {
	Certs *Keeper
	Roots *x509.CertPool
}

// Server is a server configuration that presents the current certificate
// and asks nothing of the client; HTTP/2 is offered.
func (t Trust) Server() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		NextProtos:     []string{"h2", "http/1.1"},
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return t.Certs.Current(), nil },
	}
}

// Mutual is a configuration for both ends of a connection between
// members (cluster routes, NBD): each presents its current certificate
// and requires one from the CA of the other.
func (t Trust) Mutual() *tls.Config {
	return &tls.Config{
		MinVersion:           tls.VersionTLS12,
		GetCertificate:       func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return t.Certs.Current(), nil },
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return t.Certs.Current(), nil },
		RootCAs:              t.Roots,
		ClientCAs:            t.Roots,
		ClientAuth:           tls.RequireAndVerifyClientCert,
	}
}

// Client is a client configuration that trusts the CA pool.
func (t Trust) Client() *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: t.Roots}
}
