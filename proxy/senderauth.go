package proxy

// Sender authentication (sender_auth groups, docs/PROTOCOL.md 1.10).
//
// Sending: session mode proves what the app has already written and the
// relay has read: consecutive PUBLISHes of one sender_auth group that are
// whole in the read buffer are sealed one by one, proved as one batch
// (one signature), and written together; the batch ends at the first
// packet that is not yet buffered, so it never waits for anything. Bridge
// mode, the Will, and a re-seal prove each envelope alone.
//
// Receiving: both modes open as ever, then check the proof of every
// envelope of a sender_auth group against the group's roster; a failure is
// dropped and counted under DropSenderAuth.

import (
	"fmt"

	"github.com/smqtt/smqtt/envelope"
)

// DropSenderAuth counts envelopes of a sender_auth group whose proof is
// missing or false, or whose sender the group's roster does not list.
const DropSenderAuth = "sender_auth"

// maxProofBatch bounds a session's batch: past it a batch is proved and
// written even if more is buffered. 64 envelopes share one signature at
// a proof of 260 bytes each at most.
const maxProofBatch = 64

// proofGrowthMax is the most a proof adds to an envelope.
var proofGrowthMax = envelope.MaxProofLen(maxProofBatch)

// openEnvelope opens an envelope received for group on topic and, when
// the group requires sender authentication, checks its proof.
func (sc *Sidecar) openEnvelope(dst []byte, group, topic string, msg []byte) (envelope.Header, []byte, error) {
	h, plain, err := sc.opener.Open(dst, group, topic, msg)
	if err != nil || !sc.keys.SenderAuth(group) {
		return h, plain, err
	}
	if err := sc.proofs.Check(group, topic, msg); err != nil {
		return envelope.Header{}, dst, err
	}
	return h, plain, nil
}

// sealerFor returns the sealer of a group's current epoch, and in a
// sender_auth group only once this process may sign for its sender id
// (the group's roster lists it): nothing is sealed that receivers could
// not verify.
func (sc *Sidecar) sealerFor(group string) (*envelope.Sealer, error) {
	s, err := sc.keys.Sealer(group)
	if err != nil || !sc.keys.SenderAuth(group) {
		return s, err
	}
	if _, err := sc.keys.ProofSigner(group); err != nil {
		return nil, err
	}
	return s, nil
}

// sealAlone seals one message and, in a sender_auth group, proves it as a
// batch of one. It consumes no sequence number when it cannot prove.
func (sc *Sidecar) sealAlone(dst []byte, s *envelope.Sealer, topic string, flags envelope.Flags, plain []byte) ([]byte, error) {
	group := s.Group()
	if !sc.keys.SenderAuth(group) {
		out, _, err := s.Seal(dst, topic, flags&^envelope.FlagProof, plain)
		return out, err
	}
	signer, err := sc.keys.ProofSigner(group)
	if err != nil {
		return dst, err
	}
	out, _, err := s.Seal(dst, topic, flags|envelope.FlagProof, plain)
	if err != nil {
		return dst, err
	}
	items := [1]envelope.BatchItem{{Topic: topic, Env: out}}
	if err := envelope.ProveBatch(group, signer, items[:]); err != nil {
		return dst, err
	}
	return items[0].Env, nil
}

// sealGrowth is the most sealing may add to an app's PUBLISH: more when a
// group requires proofs.
func (sc *Sidecar) sealGrowth() int64 {
	if sc.keys.AnySenderAuth() {
		return sealGrowthMax + int64(proofGrowthMax)
	}
	return sealGrowthMax
}

// batchedPublish is one PUBLISH of a session's batch: sealed, waiting for
// its proof.
type batchedPublish struct {
	p     publishPacket
	props []byte // p.props, copied out of the read buffer
	env   []byte // the envelope; its buffer is reused by later batches
}

// proofBatch is the batch a session is gathering.
type proofBatch struct {
	group  string
	signer envelope.ProofSigner
	n      int
	items  []batchedPublish // [:n] in use; the rest keep their buffers
	proofs []envelope.BatchItem
}

// batchPublish seals p for a sender_auth group into the session's batch,
// first writing the batch of another group if there is one.
func (a *appConn) batchPublish(p *publishPacket, group string, sealer *envelope.Sealer, flags envelope.Flags, plain []byte) error {
	b := &a.batch
	if b.n > 0 && b.group != group {
		if err := a.flushBatch(); err != nil {
			return err
		}
	}
	if b.n == 0 {
		signer, err := a.sc.keys.ProofSigner(group)
		if err != nil {
			return err
		}
		b.group, b.signer = group, signer
	}
	if b.n == len(b.items) {
		b.items = append(b.items, batchedPublish{})
	}
	it := &b.items[b.n]
	env, _, err := sealer.Seal(it.env[:0], p.topic, flags|envelope.FlagProof, plain)
	if err != nil {
		return fmt.Errorf("seal %q: %w", p.topic, err)
	}
	it.env = env
	it.props = append(it.props[:0], p.props...)
	it.p = *p
	it.p.props = it.props
	b.n++
	return nil
}

// flushBatch proves the session's batch with one signature and writes it
// upstream.
func (a *appConn) flushBatch() error {
	b := &a.batch
	if b.n == 0 {
		return nil
	}
	n := b.n
	b.n = 0
	b.proofs = b.proofs[:0]
	for i := range n {
		b.proofs = append(b.proofs, envelope.BatchItem{Topic: b.items[i].p.topic, Env: b.items[i].env})
	}
	if err := envelope.ProveBatch(b.group, b.signer, b.proofs); err != nil {
		return fmt.Errorf("prove a batch of %d for group %q: %w", n, b.group, err)
	}
	for i := range n {
		it := &b.items[i]
		it.env = b.proofs[i].Env
		it.p.payload = it.env
		if err := a.writeUp(&it.p, nil, true); err != nil {
			return err
		}
	}
	clear(b.proofs)
	return nil
}

// batchDue reports whether the session's batch must be written now:
// it is full, or the next packet has not been read from the app yet.
func (a *appConn) batchDue() bool {
	return a.batch.n > 0 && (a.batch.n >= maxProofBatch || !a.local.packetBuffered())
}
