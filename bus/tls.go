package bus

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/internal/netaddr"
)

// TLS is the bus's TLS: what the embedded server presents to clients and
// to the other members of its cluster, and what the connection trusts.
// Each tls.Config takes the current certificate per handshake (see
// internal/pki), so a renewal cuts no connection. A nats.conf with its
// own tls {} (or cluster { tls {} }) keeps it.
type TLS struct {
	// Server is offered to clients; they must use it when the server
	// listens off loopback, they may on loopback.
	Server *tls.Config
	// Routes is the mutual TLS of the cluster routes when the cluster
	// listens off loopback: each member presents a certificate and
	// requires one from the same CA.
	Routes *tls.Config
	// Client is the connection's: its RootCAs verify the server (the
	// embedded one or an external URL, tls:// or one that requires TLS).
	Client *tls.Config
}

// tlsHandshakeTimeout bounds a TLS handshake on the embedded server, in
// seconds (nats-server's unit).
const tlsHandshakeTimeout = 5

// configureTLS sets the embedded server's client and route TLS, once its
// listen address is known.
func (b *Bus) configureTLS(opts *server.Options) error {
	t := b.cfg.TLS
	offLoopback := !netaddr.IsLoopback(net.JoinHostPort(opts.Host, strconv.Itoa(opts.Port)))
	if opts.TLSConfig == nil && t.Server != nil {
		opts.TLSConfig, opts.TLS, opts.TLSTimeout = t.Server, true, tlsHandshakeTimeout
		opts.AllowNonTLS = !offLoopback
	}
	if offLoopback && opts.TLSConfig == nil {
		return errors.New("bus: the embedded NATS server listens off loopback without TLS: give it a certificate (volumed's CA does by default)")
	}
	// Routes off loopback take mutual TLS; on loopback they stay plain,
	// as in earlier versions, so a cluster of one host upgrades member by
	// member (a plain and a TLS route do not connect).
	if opts.Cluster.Port != 0 && opts.Cluster.TLSConfig == nil &&
		!netaddr.IsLoopback(net.JoinHostPort(opts.Cluster.Host, strconv.Itoa(opts.Cluster.Port))) {
		if t.Routes == nil {
			return errors.New("bus: the cluster {} listens off loopback without TLS on its routes: give it a certificate (volumed's CA does by default)")
		}
		opts.Cluster.TLSConfig, opts.Cluster.TLSTimeout = t.Routes, tlsHandshakeTimeout
	}
	return nil
}

// tlsOption gives the connection the trust of Config.TLS.Client, without
// requiring TLS: a server on loopback may be reached in the clear.
func (b *Bus) tlsOption() nats.Option {
	return func(o *nats.Options) error {
		if b.cfg.TLS.Client != nil {
			o.TLSConfig = b.cfg.TLS.Client.Clone()
		}
		return nil
	}
}

// connectURL is where the daemon reaches its embedded server: its client
// URL, loopback when it listens on every address.
func connectURL(srv *server.Server) string {
	u, err := url.Parse(srv.ClientURL())
	if err != nil {
		return srv.ClientURL()
	}
	if ip := net.ParseIP(u.Hostname()); ip != nil && ip.IsUnspecified() {
		u.Host = net.JoinHostPort("127.0.0.1", u.Port())
	}
	return u.String()
}

// ServerConfigTLS is the TLS part of a nats-server configuration for an
// external server or cluster: clients and routes with the given
// certificate, key and CA files; routes verify their peer.
func ServerConfigTLS(certFile, keyFile, caFile string) string {
	return fmt.Sprintf("# TLS for clients and cluster routes, certificates of volumed's CA.\n"+
		"tls {\n  cert_file: %q\n  key_file: %q\n  ca_file: %q\n  timeout: %d\n}\n"+
		"# Merge into your cluster {} block: members present a certificate of the CA and require one.\n"+
		"# cluster {\n#   tls {\n#     cert_file: %q\n#     key_file: %q\n#     ca_file: %q\n#     verify: true\n#     timeout: %d\n#   }\n# }\n",
		certFile, keyFile, caFile, tlsHandshakeTimeout, certFile, keyFile, caFile, tlsHandshakeTimeout)
}
