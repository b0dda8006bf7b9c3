package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/client"
	"github.com/volumed/volumed/httpbridge"
	"github.com/volumed/volumed/internal/netaddr"
	"github.com/volumed/volumed/internal/pki"
	"github.com/volumed/volumed/nbd"
)

// tlsFlags are the TLS settings.
type tlsFlags struct {
	// cert, key and ca are the user's (--tls-cert, --tls-key, --tls-ca);
	// empty: volumed's CA in <data-dir>/tls issues its certificates.
	cert, key, ca string
	// lifetime of the certificates volumed issues.
	lifetime time.Duration
	// sans are more names or addresses for volumed's certificate.
	sans string
	// apiTLS: auto (HTTPS off loopback), on, off (refused off loopback).
	apiTLS string
	// natsCA trusts an external NATS cluster's CA (--nats-ca).
	natsCA string
	// tokensFile is --api-tokens-file: name:token lines.
	tokensFile string
}

// Legacy and new homes of the NBD certificates in the data dir.
const (
	legacyNBDDir = "nbd-tls"
	nbdClientDir = "nbd-client"
)

// tlsFlagsFor adds the TLS flags of the daemon.
func (f *flagSet) tlsFlags(c *config) {
	t := &c.tls
	f.str(&t.cert, "tls-cert", "VOLUMED_TLS_CERT", "", "certificate (PEM, chain) for HTTPS, NATS and NBD instead of one from volumed's CA; reloaded on SIGHUP and when it changes")
	f.str(&t.key, "tls-key", "VOLUMED_TLS_KEY", "", "private key of --tls-cert")
	f.str(&t.ca, "tls-ca", "VOLUMED_TLS_CA", "", "CA certificates (PEM) of --tls-cert: what cluster members and NBD clients must present")
	f.duration(&t.lifetime, "tls-lifetime", "VOLUMED_TLS_LIFETIME", "720h", time.Second, "life of the certificates volumed's CA issues; renewed at two thirds of it")
	f.str(&t.sans, "tls-san", "VOLUMED_TLS_SAN", "", "more DNS names or addresses for volumed's certificate, comma-separated (localhost, the host name and its addresses are always in)")
	f.str(&t.apiTLS, "api-tls", "VOLUMED_API_TLS", "auto", "HTTPS for the REST API: auto (off loopback only), on, or off (refused off loopback)")
	f.str(&t.natsCA, "nats-ca", "VOLUMED_NATS_CA", "", "CA certificates (PEM) of --nats-url's servers, besides volumed's own CA")
	f.str(&t.tokensFile, "api-tokens-file", "VOLUMED_API_TOKENS_FILE", "", "file of name:token lines, more REST API tokens, each named in requested_by; read again on SIGHUP")
}

// check validates the TLS flags (errUsage).
func (t *tlsFlags) check(listen string) error {
	if (t.cert == "") != (t.key == "") || (t.cert == "") != (t.ca == "") {
		return fmt.Errorf("%w: --tls-cert, --tls-key and --tls-ca go together", errUsage)
	}
	switch t.apiTLS {
	case "auto", "on":
	case "off":
		if !netaddr.IsLoopback(listen) {
			return fmt.Errorf("%w: --api-tls=off: plain HTTP is refused off loopback (--listen %s); the API token would travel in clear text", errUsage, listen)
		}
	default:
		return fmt.Errorf("%w: --api-tls: want auto, on or off, got %q", errUsage, t.apiTLS)
	}
	if t.tokensFile != "" {
		if _, err := readTokensFile(t.tokensFile); err != nil {
			return fmt.Errorf("%w: --api-tokens-file: %w", errUsage, err)
		}
	}
	return nil
}

// apiHTTPS reports whether the REST API serves HTTPS.
func (t *tlsFlags) apiHTTPS(listen string) bool {
	return t.apiTLS == "on" || (t.apiTLS == "auto" && !netaddr.IsLoopback(listen))
}

// caFile is the CA clients trust: --tls-ca or volumed's.
func (t *tlsFlags) caFile(dataDir string) string {
	if t.ca != "" {
		return t.ca
	}
	return filepath.Join(tlsDir(dataDir), pki.CAFile)
}

// tlsDir is the TLS directory of a data dir.
func tlsDir(dataDir string) string { return filepath.Join(dataDir, pki.DirName) }

// security is what the daemon's TLS and tokens are made of.
type security struct {
	trust  pki.Trust
	ca     *pki.CA // nil with the user's certificates
	keeper *pki.Keeper
	tokens *httpbridge.Tokens
	// nbdClient keeps the NBD client certificate files, when volumed's CA
	// issues them.
	nbdClient *pki.Keeper
}

// startSecurity loads or makes the CA and the daemon's certificate and
// reads the tokens file; it returns what it started, to be closed.
func startSecurity(ctx context.Context, cfg config, log *slog.Logger) (*security, []component, error) {
	t := cfg.tls
	s := &security{}
	var kc pki.KeeperConfig
	if t.cert != "" {
		roots, err := client.LoadCA(t.ca)
		if err != nil {
			return nil, nil, fmt.Errorf("%w: --tls-ca: %w", errUsage, err)
		}
		s.trust.Roots = roots
		kc = pki.KeeperConfig{CertFile: t.cert, KeyFile: t.key, Logger: log}
	} else {
		ca, err := pki.LoadCA(tlsDir(cfg.dataDir))
		if err != nil {
			return nil, nil, err
		}
		s.ca, s.trust.Roots = ca, ca.Pool()
		host, _ := os.Hostname()
		kc = pki.KeeperConfig{Issuer: ca, Name: "volumed " + host, Hosts: pki.LocalHosts(certHosts(cfg)...),
			Lifetime: t.lifetime, Logger: log}
	}
	k, err := pki.NewKeeper(kc)
	if err != nil {
		return nil, nil, err
	}
	if err := k.Start(ctx); err != nil {
		return nil, nil, err
	}
	s.keeper, s.trust.Certs = k, k
	started := []component{k}
	var byName map[string]string
	if t.tokensFile != "" {
		if byName, err = readTokensFile(t.tokensFile); err != nil {
			return nil, started, fmt.Errorf("%w: --api-tokens-file: %w", errUsage, err)
		}
	}
	if s.tokens, err = httpbridge.NewTokens(byName); err != nil {
		return nil, started, fmt.Errorf("%w: --api-tokens-file: %w", errUsage, err)
	}
	return s, started, nil
}

// certHosts are the hosts of the listen addresses and --tls-san, for
// volumed's certificate.
func certHosts(cfg config) []string {
	var hosts []string
	for _, l := range []string{cfg.listen, cfg.nbdListen} {
		if h, _, err := net.SplitHostPort(l); err == nil {
			hosts = append(hosts, h)
		}
	}
	for _, s := range strings.Split(cfg.tls.sans, ",") {
		hosts = append(hosts, strings.TrimSpace(s))
	}
	return hosts
}

// busTLS is the bus's TLS: the embedded server's, and the trust of its
// connection (volumed's CA or --tls-ca, and --nats-ca).
func (s *security) busTLS(cfg config) (bus.TLS, error) {
	roots := s.trust.Roots.Clone()
	if cfg.tls.natsCA != "" {
		if err := appendPEMFile(roots, cfg.tls.natsCA); err != nil {
			return bus.TLS{}, err
		}
	}
	srv := s.trust.Server()
	srv.NextProtos = nil
	client := s.trust.Client()
	client.RootCAs = roots
	return bus.TLS{Server: srv, Routes: s.trust.Mutual(), Client: client}, nil
}

// agentBusTLS is the trust of `volumed agent`'s connection: --nats-ca, or
// the system's roots.
func agentBusTLS(cfg config) (bus.TLS, error) {
	if cfg.tls.natsCA == "" {
		return bus.TLS{}, nil
	}
	roots := x509.NewCertPool()
	if err := appendPEMFile(roots, cfg.tls.natsCA); err != nil {
		return bus.TLS{}, err
	}
	return bus.TLS{Client: &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots}}, nil
}

func appendPEMFile(pool *x509.CertPool, path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("%w: --nats-ca: %w", errUsage, err)
	}
	if !pool.AppendCertsFromPEM(data) {
		return fmt.Errorf("%w: --nats-ca: no certificate in %s", errUsage, path)
	}
	return nil
}

// apiTLS is the REST API's TLS, nil for plain HTTP.
func (s *security) apiTLS(cfg config) *tls.Config {
	if !cfg.tls.apiHTTPS(cfg.listen) {
		return nil
	}
	return s.trust.Server()
}

// nbdTLS is the NBD server's TLS: the certificates of an earlier version
// in <data-dir>/nbd-tls when they are there (their clients keep working;
// delete the directory to move to volumed's CA); otherwise volumed's
// certificate, clients presenting one of its CA, whose files volumed
// keeps in <data-dir>/tls/nbd-client for libnbd and qemu.
func (s *security) nbdTLS(ctx context.Context, cfg config, log *slog.Logger) (*tls.Config, []component, error) {
	legacy := filepath.Join(cfg.dataDir, legacyNBDDir)
	if _, err := os.Stat(filepath.Join(legacy, nbd.ServerCertFile)); err == nil {
		log.Info("nbd: using the certificates of " + legacy + "; delete it to move to volumed's CA in " + tlsDir(cfg.dataDir))
		c, err := nbd.TLSConfig(legacy, nil)
		return c, nil, err
	}
	var started []component
	if s.ca != nil {
		dir := filepath.Join(tlsDir(cfg.dataDir), nbdClientDir)
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, nil, err
		}
		if err := os.WriteFile(filepath.Join(dir, nbd.CACertFile), s.ca.CertPEM(), 0o644); err != nil {
			return nil, nil, err
		}
		k, err := pki.NewKeeper(pki.KeeperConfig{Issuer: s.ca, Name: "volumed NBD client", Lifetime: cfg.tls.lifetime,
			WriteCert: filepath.Join(dir, nbd.ClientCertFile), WriteKey: filepath.Join(dir, nbd.ClientKeyFile), Logger: log})
		if err != nil {
			return nil, nil, err
		}
		if err := k.Start(ctx); err != nil {
			return nil, nil, err
		}
		started = append(started, k)
	}
	c := s.trust.Mutual()
	c.GetClientCertificate, c.RootCAs = nil, nil
	return c, started, nil
}

// readTokensFile reads an --api-tokens-file.
func readTokensFile(path string) (map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	byName, err := httpbridge.ParseTokens(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if _, err := httpbridge.NewTokens(byName); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return byName, nil
}

// reloadOnHUP reads the user's certificate and the tokens file again on
// every SIGHUP until ctx ends; a bad reload keeps what was there.
func (s *security) reloadOnHUP(ctx context.Context, cfg config, log *slog.Logger) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	go func() {
		defer signal.Stop(hup)
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
			}
			if err := s.reload(cfg); err != nil {
				log.Error("reload on SIGHUP", "err", err)
				continue
			}
			log.Info("reloaded on SIGHUP", "tokens", s.tokens.Len())
		}
	}()
}

// reload reads the user's certificate and the tokens file again.
func (s *security) reload(cfg config) error {
	var errs []error
	if err := s.keeper.Reload(); err != nil {
		errs = append(errs, err)
	}
	if cfg.tls.tokensFile != "" {
		byName, err := readTokensFile(cfg.tls.tokensFile)
		if err == nil {
			err = s.tokens.Set(byName)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("--api-tokens-file: %w", err))
		}
	}
	return errors.Join(errs...)
}
