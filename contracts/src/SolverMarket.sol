// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title SolverMarket — stakes, escrow, commitments, verifier choice, two-phase
/// bisection disputes and payouts for solvernet jobs. Amounts are wei everywhere.
/// docs/contracts.md states every rule, role, deadline and trust assumption; this file
/// keeps to it.
///
/// Money never leaves by push except burns: payouts, refunds and unbonded stake are
/// credited to `withdrawable` and pulled with withdraw(), so a hostile receiver cannot
/// block a job's settlement.
contract SolverMarket {
    // ---------------------------------------------------------------- nodes

    /// A node's free stake and its pull balance share one slot: a payout and a stake
    /// unlock are one storage write.
    struct Account {
        uint128 stake; // bonded and not locked in a job
        uint128 withdrawable; // earned, refunded or unbonded; leaves with withdraw()
    }

    struct Unbonding {
        uint128 amount;
        uint64 readyBlock;
    }

    mapping(address => Account) public accounts;
    mapping(address => Unbonding) public unbondings;
    mapping(address => bytes32) public nodeIdOf;
    mapping(bytes32 => address) public ownerOfNode;
    /// Every registered node in registration order: the pool verifiers are drawn from.
    address[] public nodes;

    // ---------------------------------------------------------------- jobs

    /// A job is two storage slots, three with a distinct referee or verifier seats: a
    /// post writes as few fresh slots as the job needs (each costs 22.1k gas).
    struct Job {
        // Slot 0: everything commit(), accept() and challenge() read and write.
        uint32 commitDeadline; // last block at which a solver may commit
        uint32 lastCommitBlock; // block of the latest commit (interim or final)
        uint32 challengeWindow; // blocks after the commit phase
        uint88 stakePerRole; // locked from each solver and verifier until finalize
        uint8 flags; // FINALIZED | HAS_SLOT_2 | ALL_FINAL
        uint16 solverCount;
        uint16 seated; // live solver seats (a slashed seat is removed)
        uint16 committed; // live final commits
        uint8 verifiersAccepted; // postJob caps verifierCount at MAX_VERIFIERS
        uint8 openDisputes; // challenge caps it at 255
        // Slot 1: read by finalize.
        address submitter;
        uint96 pricePerSolver;
        // Slot 2: written (and HAS_SLOT_2 set) only for a referee other than the
        // submitter, verifier seats or a verifier fee; else zero and never read.
        address referee; // 0: the submitter
        uint80 verifierFee;
        uint16 verifierCount;
    }

    /// getJob's answer: the terms as posted (referee resolved) and the job's progress.
    struct JobView {
        address submitter;
        address referee;
        uint16 solverCount;
        uint16 verifierCount;
        uint96 pricePerSolver;
        uint80 verifierFee;
        uint88 stakePerRole;
        uint32 commitDeadline;
        uint32 challengeWindow;
        uint32 lastCommitBlock;
        uint16 committed;
        uint16 verifiersAccepted;
        uint16 openDisputes;
        bool finalized;
        uint16 seated;
        bool allFinal;
    }

    uint8 private constant FINALIZED = 1;
    uint8 private constant HAS_SLOT_2 = 2;
    /// Every seat committed final: the commit phase is over (no commit is taken after).
    uint8 private constant ALL_FINAL = 4;
    uint16 public constant MAX_VERIFIERS = 255;

    mapping(uint256 => Job) internal jobs;
    /// A participant's role in a job, one slot so commit() reads one word: 0 = none,
    /// SLASHED = a solver whose commit lost a dispute, VERIFIER, else the solver's root.
    mapping(uint256 => mapping(address => bytes32)) internal roleOf;
    bytes32 private constant SLASHED = bytes32(uint256(1));
    bytes32 private constant VERIFIER = bytes32(uint256(2));

    /// What a proof is checked against besides the root, and the seat's dispute.
    struct Seat {
        uint48 leafCount; // leaves in the committed tree (N = steps + 1)
        bool isFinal;
        uint64 disputeId; // 0 = never challenged
    }

    mapping(uint256 => mapping(address => Seat)) internal seats;
    uint256 public jobCount;

    // ---------------------------------------------------------------- disputes

    /// Whose move it is. Step phase: StepClaim (solver) / StepBisect (challenger);
    /// operation phase: OpsPost, OpsClaim (solver) / OpsBisect (challenger); then Referee.
    enum Stage {
        None,
        StepClaim, // solver: the leaf at mid = (lo+hi)/2 with its Merkle proof
        StepBisect, // challenger: agree or not with that leaf
        OpsPost, // solver: the step's operation count and the commit op's inputs
        OpsClaim, // solver: the operation chain hash r_mid
        OpsBisect, // challenger: agree or not with r_mid
        Referee, // narrowed to one operation: the job's referee rules
        Closed
    }

    /// Six slots; a turn rewrites slot 0 and one or two of the others.
    struct Dispute {
        // Slot 0
        address challenger;
        uint32 deadline; // last block for the party whose turn it is
        Stage stage;
        uint48 lo; // agreed index: a leaf (step phase) or an operation (ops phase)
        // Slot 1
        address solver;
        uint48 hi; // disputed index
        uint48 opCount; // m, once posted
        // Slot 2
        uint128 bond;
        uint64 jobId;
        uint48 step; // the disputed step t (leaf t), once narrowed to one step
        // Slots 3-5
        bytes32 loHash; // leaf lo / r_lo: agreed
        bytes32 hiHash; // leaf hi / r_hi: the solver's, disputed
        bytes32 midHash; // the solver's claim at mid, until the challenger answers
    }

    /// getDispute's answer (the stage, both ends and their hashes, whose deadline).
    struct DisputeView {
        Stage stage;
        uint64 jobId;
        address solver;
        address challenger;
        uint48 step;
        uint48 lo;
        uint48 hi;
        uint48 opCount;
        bytes32 loHash;
        bytes32 hiHash;
        bytes32 midHash;
        uint32 deadline;
        uint128 bond;
    }

    mapping(uint256 => Dispute) internal disputes;
    uint256 public disputeCount;

    uint64 public immutable unbondingBlocks;
    uint64 public immutable turnBlocks;
    /// The referee's time to rule: it fetches tensors and recomputes one operation.
    uint256 public constant REFEREE_TURNS = 4;
    /// Candidates the verifier walk looks at, so accept() costs bounded gas.
    uint256 public constant WALK_CAP = 64;
    /// Share of a slashed amount that goes to the winner; the rest is burnt.
    uint256 public constant WINNER_SHARE_BPS = 5000;
    address public constant BURN_ADDRESS = address(0xdEaD);

    // ---------------------------------------------------------------- events

    event NodeRegistered(address indexed node, bytes32 indexed nodeId);
    event Staked(address indexed node, uint256 amount, uint256 stake);
    event UnstakeRequested(address indexed node, uint256 amount, uint64 readyBlock);
    event Withdrawn(address indexed account, uint256 amount);
    /// Terms are read with getJob(jobId).
    event JobPosted(uint256 indexed jobId, address indexed submitter, address indexed referee, bytes32 spec);
    event VerifierAccepted(uint256 indexed jobId, address indexed verifier);
    event Committed(uint256 indexed jobId, address indexed solver, bytes32 root, uint48 leafCount, bool isFinal);
    event Challenged(
        uint256 indexed jobId,
        uint256 indexed disputeId,
        address indexed solver,
        address challenger,
        uint48 lo,
        uint48 hi,
        bytes32 loLeaf,
        bytes32 hiLeaf,
        uint256 bond,
        uint32 deadline
    );
    event LeafClaimed(uint256 indexed disputeId, uint48 mid, bytes32 leaf, uint32 deadline);
    event OpsPosted(
        uint256 indexed disputeId,
        uint48 step,
        uint48 opCount,
        bytes32 r0,
        bytes32 rLast,
        bytes32 stateHash,
        bytes32 inboundDigest,
        bytes32 outboundDigest,
        uint32 deadline
    );
    event OpClaimed(uint256 indexed disputeId, uint48 mid, bytes32 r, uint32 deadline);
    /// After each answer: the new agreed/disputed ends (leaf or op indices).
    event Bisected(uint256 indexed disputeId, Stage stage, uint48 lo, uint48 hi, uint32 deadline);
    /// Narrowed to operation j of step `step`: the referee recomputes it.
    event RefereeTurn(uint256 indexed disputeId, uint48 step, uint48 j, bytes32 rPrev, bytes32 r, uint32 deadline);
    /// The winner received slashed - burnt.
    event DisputeResolved(
        uint256 indexed disputeId, address indexed winner, address indexed loser, uint256 slashed, uint256 burnt, bool byTimeout
    );
    /// The referee did not rule in time: bond returned, nobody slashed.
    event DisputeCancelled(uint256 indexed disputeId);
    event JobFinalized(uint256 indexed jobId, uint256 solversPaid, uint256 verifiersPaid, uint256 refund);

    constructor(uint64 unbondingBlocks_, uint64 turnBlocks_) {
        require(unbondingBlocks_ > 0 && turnBlocks_ > 0, "delays must be > 0");
        require(turnBlocks_ * REFEREE_TURNS < type(uint32).max, "turn blocks too large");
        unbondingBlocks = unbondingBlocks_;
        turnBlocks = turnBlocks_;
    }

    // ---------------------------------------------------------------- staking

    /// Binds a solvernet node id to the sender (once, for good), adds it to the
    /// verifier pool and stakes msg.value.
    function register(bytes32 nodeId) external payable {
        require(nodeId != bytes32(0), "node id is zero");
        require(nodeIdOf[msg.sender] == bytes32(0), "address already registered");
        require(ownerOfNode[nodeId] == address(0), "node id already bound");
        nodeIdOf[msg.sender] = nodeId;
        ownerOfNode[nodeId] = msg.sender;
        nodes.push(msg.sender);
        emit NodeRegistered(msg.sender, nodeId);
        if (msg.value > 0) _addStake(msg.value);
    }

    function stake() external payable {
        require(nodeIdOf[msg.sender] != bytes32(0), "not a registered node");
        require(msg.value > 0, "stake must be > 0");
        _addStake(msg.value);
    }

    /// Moves AMOUNT of free stake to unbonding; it becomes withdrawable after
    /// unbondingBlocks, so a node cannot dodge a slash it sees coming.
    function unstake(uint128 amount) external {
        Account storage account = accounts[msg.sender];
        require(amount > 0, "amount must be > 0");
        require(account.stake >= amount, "amount exceeds free stake");
        account.stake -= amount;
        Unbonding storage unbonding = unbondings[msg.sender];
        unbonding.amount += amount;
        unbonding.readyBlock = uint64(block.number) + unbondingBlocks;
        emit UnstakeRequested(msg.sender, amount, unbonding.readyBlock);
    }

    /// Pays the sender its withdrawable balance plus any stake whose unbonding is over.
    function withdraw() external {
        Account storage account = accounts[msg.sender];
        uint256 amount = account.withdrawable;
        account.withdrawable = 0;
        Unbonding storage unbonding = unbondings[msg.sender];
        if (unbonding.amount > 0 && block.number >= unbonding.readyBlock) {
            amount += unbonding.amount;
            delete unbondings[msg.sender];
        }
        require(amount > 0, "nothing to withdraw");
        emit Withdrawn(msg.sender, amount);
        (bool sent,) = msg.sender.call{value: amount}("");
        require(sent, "transfer failed");
    }

    function _addStake(uint256 amount) private {
        Account storage account = accounts[msg.sender];
        account.stake += uint128(amount);
        emit Staked(msg.sender, amount, account.stake);
    }

    // ---------------------------------------------------------------- jobs

    /// Posts a job; msg.value must equal the escrow
    /// solverCount * pricePerSolver + verifierCount * verifierFee. REFEREE 0 means the
    /// submitter referees.
    function postJob(
        uint16 solverCount,
        uint16 verifierCount,
        uint96 pricePerSolver,
        uint80 verifierFee,
        uint88 stakePerRole,
        uint32 commitBlocks,
        uint32 challengeWindow,
        address referee,
        bytes32 spec
    ) external payable returns (uint256 jobId) {
        require(solverCount > 0, "solver count must be > 0");
        require(verifierCount <= MAX_VERIFIERS, "verifier count must be <= 255");
        require(commitBlocks > 0, "commit blocks must be > 0");
        require(stakePerRole > 0, "stake per role must be > 0");
        require(challengeWindow > 0, "challenge window must be > 0");
        uint256 escrow = uint256(solverCount) * pricePerSolver + uint256(verifierCount) * verifierFee;
        require(msg.value == escrow, "value must equal escrow");
        uint256 commitDeadline = block.number + commitBlocks;
        require(commitDeadline + challengeWindow <= type(uint32).max, "deadlines beyond block 2^32");
        jobId = ++jobCount;
        Job storage job = jobs[jobId];
        // Field by field, so the optimizer writes each slot once and skips a zero slot 2.
        job.commitDeadline = uint32(commitDeadline);
        job.challengeWindow = challengeWindow;
        job.stakePerRole = stakePerRole;
        job.solverCount = solverCount;
        job.submitter = msg.sender;
        job.pricePerSolver = pricePerSolver;
        if (referee == msg.sender) referee = address(0);
        if (referee != address(0) || verifierCount > 0 || verifierFee > 0) {
            job.referee = referee;
            job.verifierFee = verifierFee;
            job.verifierCount = verifierCount;
            job.flags = HAS_SLOT_2;
        }
        emit JobPosted(jobId, msg.sender, referee == address(0) ? msg.sender : referee, spec);
    }

    /// A solver's commitment: the Keccak Merkle root over its LEAFCOUNT step leaves
    /// (docs/contracts.md "Merkle proofs"). The first call takes a seat and locks the
    /// stake; later calls replace the root while not final (LEAFCOUNT must grow);
    /// ISFINAL closes the solver's commitment. Once every seat is final, commits close.
    function commit(uint256 jobId, bytes32 root, uint48 leafCount, bool isFinal) external {
        Job storage job = jobs[jobId];
        require(job.solverCount > 0, "no such job");
        require(uint256(root) > 2, "root is zero or reserved");
        require(leafCount > 0, "leaf count must be > 0");
        require(block.number <= job.commitDeadline && job.flags & ALL_FINAL == 0, "commit deadline passed");
        bytes32 role = roleOf[jobId][msg.sender];
        Seat storage seat = seats[jobId][msg.sender];
        if (role == 0) {
            require(job.seated < job.solverCount, "solver seats full");
            _lockStake(job.stakePerRole);
            job.seated += 1;
        } else {
            require(role != VERIFIER, "a verifier cannot solve");
            require(role != SLASHED, "commit was disputed");
            require(!seat.isFinal, "already committed");
            require(leafCount > seat.leafCount, "leaf count must grow");
        }
        roleOf[jobId][msg.sender] = root;
        seat.leafCount = leafCount;
        if (isFinal) {
            seat.isFinal = true;
            job.committed += 1;
            if (job.committed == job.solverCount) job.flags |= ALL_FINAL;
        }
        job.lastCommitBlock = uint32(block.number);
        emit Committed(jobId, msg.sender, root, leafCount, isFinal);
    }

    function _lockStake(uint88 amount) private {
        Account storage account = accounts[msg.sender];
        // Stake exists only on registered nodes and amount > 0, so one read decides.
        if (account.stake < amount) {
            revert(nodeIdOf[msg.sender] == bytes32(0) ? "not a registered node" : "free stake below the job's stake");
        }
        account.stake -= amount;
    }

    // ---------------------------------------------------------------- verifier choice

    /// The block whose hash seeds the verifier choice: the one after the last commit
    /// once every seat is final, else the one after the commit deadline. Nobody knows
    /// its hash while a solver can still commit.
    function _seedBlock(Job storage job) private view returns (uint256) {
        if (job.flags & ALL_FINAL != 0) return uint256(job.lastCommitBlock) + 1;
        require(block.number > job.commitDeadline, "commits not final yet");
        return uint256(job.commitDeadline) + 1;
    }

    /// Last block of the challenge window (accept and challenge end there).
    function _windowEnd(Job storage job) private view returns (uint256) {
        uint256 base = job.flags & ALL_FINAL != 0 ? job.lastCommitBlock : job.commitDeadline;
        return base + job.challengeWindow;
    }

    /// K(blockhash(seedBlock) ‖ jobId). Reverts until the seed block is mined. Past
    /// 256 blocks (blockhash forgets) the newest block seedBlock + 256·k stands in.
    function verifierSeed(uint256 jobId) public view returns (bytes32) {
        Job storage job = jobs[jobId];
        require(job.solverCount > 0, "no such job");
        uint256 seedBlock = _seedBlock(job);
        require(block.number > seedBlock, "seed block not mined yet");
        if (block.number - seedBlock > 256) seedBlock += ((block.number - seedBlock - 1) / 256) * 256;
        return keccak256(abi.encodePacked(blockhash(seedBlock), jobId));
    }

    /// The node that may take verifier seat SEAT now (0: nobody eligible). The walk
    /// visits nodes[(seed + seat + i) % nodes.length] for i < min(nodes, WALK_CAP),
    /// keeping those eligible: not a solver, verifier or the referee of the job, free
    /// stake >= stakePerRole. Candidate k = ⌊(block − seedBlock − 1) / turnBlocks⌋ of that list
    /// (mod its length) is selected: each gets turnBlocks to accept, then the next.
    function selectedVerifier(uint256 jobId, uint256 seat) public view returns (address) {
        uint256 seed = uint256(verifierSeed(jobId));
        uint256 count = nodes.length;
        if (count == 0) return address(0);
        (address[] memory eligible, uint256 found) = _eligible(jobId, (seed % count + seat % count) % count, count);
        if (found == 0) return address(0);
        uint256 wanted = (block.number - _seedBlock(jobs[jobId]) - 1) / turnBlocks;
        return eligible[wanted % found];
    }

    /// The eligible nodes among min(COUNT, WALK_CAP) from START on, in walk order.
    function _eligible(uint256 jobId, uint256 start, uint256 count)
        private
        view
        returns (address[] memory eligible, uint256 found)
    {
        Job storage job = jobs[jobId];
        uint88 need = job.stakePerRole;
        address referee = _referee(job); // it rules disputes: it may not open one
        uint256 steps = count < WALK_CAP ? count : WALK_CAP;
        eligible = new address[](steps);
        for (uint256 i = 0; i < steps; ++i) {
            address node = nodes[(start + i) % count];
            if (roleOf[jobId][node] != 0 || node == referee || accounts[node].stake < need) continue;
            eligible[found++] = node;
        }
    }

    /// The selected node takes the next verifier seat, locking stakePerRole until
    /// finalize. Open from the seed until the challenge window ends.
    function accept(uint256 jobId) external {
        Job storage job = jobs[jobId];
        require(job.solverCount > 0, "no such job");
        require(job.flags & FINALIZED == 0 && block.number <= _windowEnd(job), "job closed for roles");
        require(job.verifiersAccepted < job.verifierCount, "verifier seats full");
        require(msg.sender == selectedVerifier(jobId, job.verifiersAccepted), "not the selected verifier");
        _lockStake(job.stakePerRole);
        roleOf[jobId][msg.sender] = VERIFIER;
        job.verifiersAccepted += 1;
        emit VerifierAccepted(jobId, msg.sender);
    }

    // ---------------------------------------------------------------- Merkle proofs

    /// Whether LEAF is leaf INDEX of the COUNT-leaf tree ROOT: leaf node K(0x00 ‖ leaf),
    /// inner K(0x01 ‖ l ‖ r), an odd last node carried up; PROOF lists the siblings
    /// bottom-up (a carried level has none). As core/merkle.cpp with MerkleHash::keccak256.
    function verifyLeaf(bytes32 root, uint256 count, uint256 index, bytes32 leaf, bytes32[] calldata proof)
        public
        pure
        returns (bool)
    {
        if (index >= count) return false;
        bytes32 node;
        assembly {
            mstore(0x00, 0)
            mstore(0x01, leaf)
            node := keccak256(0x00, 33)
        }
        uint256 k = 0;
        while (count > 1) {
            if (index & 1 == 1 || index + 1 < count) {
                if (k == proof.length) return false;
                bytes32 sibling = proof[k++];
                node = index & 1 == 1 ? _inner(sibling, node) : _inner(node, sibling);
            }
            index >>= 1;
            count = (count + 1) >> 1;
        }
        return k == proof.length && node == root;
    }

    function _inner(bytes32 left, bytes32 right) private pure returns (bytes32 h) {
        assembly {
            let p := mload(0x40) // scratch past the free pointer; not kept
            mstore8(p, 1)
            mstore(add(p, 1), left)
            mstore(add(p, 33), right)
            h := keccak256(p, 65)
        }
    }

    function _checkLeaf(uint256 jobId, address solver, uint256 index, bytes32 leaf, bytes32[] calldata proof)
        private
        view
    {
        require(
            verifyLeaf(roleOf[jobId][solver], seats[jobId][solver].leafCount, index, leaf, proof), "bad Merkle proof"
        );
    }

    // ---------------------------------------------------------------- operation chain

    /// r_0 of step t's operation chain: K("solvernet/ops/v1" ‖ leaf_{t-1}).
    function opsStart(bytes32 leafPrev) public pure returns (bytes32) {
        return keccak256(abi.encodePacked("solvernet/ops/v1", leafPrev));
    }

    /// The record hash of a step's last operation, `commit` (docs/verification.md):
    /// inputs state, inbound, outbound; output leaf.
    function commitRecordHash(bytes32 stateHash, bytes32 inboundDigest, bytes32 outboundDigest, bytes32 leaf)
        public
        pure
        returns (bytes32)
    {
        return keccak256(
            abi.encodePacked(
                "solvernet/op/v1",
                keccak256("commit"),
                uint32(0),
                uint32(0),
                uint32(3),
                keccak256("state"),
                stateHash,
                keccak256("inbound"),
                inboundDigest,
                keccak256("outbound"),
                outboundDigest,
                uint32(1),
                keccak256("leaf"),
                leaf
            )
        );
    }

    // ---------------------------------------------------------------- disputes

    /// A verifier of the job disputes SOLVER's commitment: it agrees with leaf LO and
    /// disputes leaf HI (0 <= lo < hi < leafCount), both proven against the solver's
    /// root. Posts a bond of at least stakePerRole. One challenge per commit, within
    /// the window.
    function challenge(
        uint256 jobId,
        address solver,
        uint48 lo,
        bytes32 loLeaf,
        bytes32[] calldata loProof,
        uint48 hi,
        bytes32 hiLeaf,
        bytes32[] calldata hiProof
    ) external payable returns (uint256 disputeId) {
        _checkChallenge(jobId, solver, lo, hi);
        _checkLeaf(jobId, solver, lo, loLeaf, loProof);
        _checkLeaf(jobId, solver, hi, hiLeaf, hiProof);
        disputeId = _openDispute(jobId, solver, lo, loLeaf, hi, hiLeaf);
    }

    function _checkChallenge(uint256 jobId, address solver, uint48 lo, uint48 hi) private view {
        Job storage job = jobs[jobId];
        require(roleOf[jobId][msg.sender] == VERIFIER, "only a verifier of the job");
        require(uint256(roleOf[jobId][solver]) > 2, "no commit to challenge");
        Seat storage seat = seats[jobId][solver];
        require(seat.disputeId == 0, "commit already challenged");
        require(job.flags & FINALIZED == 0, "job finalized");
        require(block.number <= _windowEnd(job), "challenge window over");
        require(hi > lo, "empty step range");
        require(hi < seat.leafCount, "leaf index beyond the commitment");
        require(msg.value >= job.stakePerRole && msg.value > 0, "bond below the job's stake");
        require(job.openDisputes < type(uint8).max, "too many open disputes");
    }

    function _openDispute(uint256 jobId, address solver, uint48 lo, bytes32 loLeaf, uint48 hi, bytes32 hiLeaf)
        private
        returns (uint256 disputeId)
    {
        disputeId = ++disputeCount;
        seats[jobId][solver].disputeId = uint64(disputeId);
        jobs[jobId].openDisputes += 1;
        Dispute storage d = disputes[disputeId];
        uint32 deadline = uint32(block.number + turnBlocks);
        d.challenger = msg.sender;
        d.deadline = deadline;
        d.lo = lo;
        d.solver = solver;
        d.hi = hi;
        d.bond = uint128(msg.value);
        d.jobId = uint64(jobId);
        d.loHash = loLeaf;
        d.hiHash = hiLeaf;
        if (hi - lo == 1) {
            d.stage = Stage.OpsPost;
            d.step = hi;
        } else {
            d.stage = Stage.StepClaim;
        }
        emit Challenged(jobId, disputeId, solver, msg.sender, lo, hi, loLeaf, hiLeaf, msg.value, deadline);
    }

    /// Solver's step round: its leaf at mid = (lo+hi)/2, proven against its root.
    function claimLeaf(uint256 disputeId, bytes32 leaf, bytes32[] calldata proof) external {
        Dispute storage d = disputes[disputeId];
        _solverTurn(d, Stage.StepClaim);
        uint48 mid = _mid(d);
        _checkLeaf(d.jobId, d.solver, mid, leaf, proof);
        d.midHash = leaf;
        uint32 deadline = _next(d, Stage.StepBisect, turnBlocks);
        emit LeafClaimed(disputeId, mid, leaf, deadline);
    }

    /// Solver's opening of the operation phase for step t = hi: the step's operation
    /// count M, r_{M-1}, and the inputs of its last operation (commit). The contract
    /// computes r_0 from leaf t-1 and r_M from r_{M-1} and the commit record whose
    /// output is leaf t, so the leaf the solver committed is bound to its own trace.
    function postOps(
        uint256 disputeId,
        uint48 opCount,
        bytes32 rPrev,
        bytes32 stateHash,
        bytes32 inboundDigest,
        bytes32 outboundDigest
    ) external {
        Dispute storage d = disputes[disputeId];
        _solverTurn(d, Stage.OpsPost);
        require(opCount > 0, "operation count must be > 0");
        bytes32 r0 = opsStart(d.loHash);
        require(opCount > 1 || rPrev == r0, "one operation: r_0 must precede it");
        bytes32 rLast = keccak256(
            abi.encodePacked(rPrev, commitRecordHash(stateHash, inboundDigest, outboundDigest, d.hiHash))
        );
        d.lo = 0;
        d.hi = opCount;
        d.opCount = opCount;
        d.loHash = r0;
        d.hiHash = rLast;
        uint32 deadline = opCount == 1 ? _toReferee(disputeId, d) : _next(d, Stage.OpsClaim, turnBlocks);
        emit OpsPosted(
            disputeId, d.step, opCount, r0, rLast, stateHash, inboundDigest, outboundDigest, deadline
        );
    }

    /// Solver's operation round: the chain hash r_mid after operation mid = (lo+hi)/2.
    function claimOp(uint256 disputeId, bytes32 r) external {
        Dispute storage d = disputes[disputeId];
        _solverTurn(d, Stage.OpsClaim);
        d.midHash = r;
        uint32 deadline = _next(d, Stage.OpsBisect, turnBlocks);
        emit OpClaimed(disputeId, _mid(d), r, deadline);
    }

    /// Challenger's round in either phase: agreeing with the solver's claim at mid
    /// moves lo up, disagreeing moves hi down. One step apart, the operation phase
    /// begins; one operation apart, the referee's turn.
    function bisect(uint256 disputeId, bool agree) external {
        Dispute storage d = disputes[disputeId];
        Stage stage = d.stage;
        require(stage == Stage.StepBisect || stage == Stage.OpsBisect, "not the challenger's turn");
        require(msg.sender == d.challenger, "only the challenger");
        require(block.number <= d.deadline, "turn deadline passed");
        uint48 lo = d.lo;
        uint48 hi = d.hi;
        uint48 mid = _mid(d);
        if (agree) {
            lo = mid;
            d.lo = mid;
            d.loHash = d.midHash;
        } else {
            hi = mid;
            d.hi = mid;
            d.hiHash = d.midHash;
        }
        uint32 deadline;
        Stage next;
        if (hi - lo > 1) {
            next = stage == Stage.StepBisect ? Stage.StepClaim : Stage.OpsClaim;
            deadline = _next(d, next, turnBlocks);
        } else if (stage == Stage.StepBisect) {
            next = Stage.OpsPost;
            d.step = hi;
            deadline = _next(d, next, turnBlocks);
        } else {
            next = Stage.Referee;
            deadline = _toReferee(disputeId, d);
        }
        emit Bisected(disputeId, next, lo, hi, deadline);
    }

    /// The job's referee rules on the one disputed operation.
    function resolve(uint256 disputeId, bool solverWins) external {
        Dispute storage d = disputes[disputeId];
        require(d.stage == Stage.Referee, "dispute not narrowed to one operation");
        require(msg.sender == _referee(jobs[d.jobId]), "only the job's referee");
        require(block.number <= d.deadline, "referee deadline passed");
        _settle(disputeId, solverWins, false);
    }

    /// Anyone may end a dispute whose party missed its turn: a silent solver or
    /// challenger loses; a silent referee cancels it (bond back, nobody slashed).
    function timeout(uint256 disputeId) external {
        Dispute storage d = disputes[disputeId];
        Stage stage = d.stage;
        require(stage != Stage.None && stage != Stage.Closed, "no turn to time out");
        require(block.number > d.deadline, "turn deadline not passed");
        if (stage == Stage.Referee) {
            d.stage = Stage.Closed;
            jobs[d.jobId].openDisputes -= 1;
            accounts[d.challenger].withdrawable += d.bond;
            emit DisputeCancelled(disputeId);
            return;
        }
        _settle(disputeId, stage == Stage.StepBisect || stage == Stage.OpsBisect, true);
    }

    function _referee(Job storage job) private view returns (address) {
        address referee = job.referee;
        return referee == address(0) ? job.submitter : referee;
    }

    function _mid(Dispute storage d) private view returns (uint48) {
        return uint48((uint256(d.lo) + d.hi) / 2);
    }

    function _solverTurn(Dispute storage d, Stage stage) private view {
        require(d.stage == stage, "not the solver's turn");
        require(msg.sender == d.solver, "only the disputed solver");
        require(block.number <= d.deadline, "turn deadline passed");
    }

    function _next(Dispute storage d, Stage stage, uint256 blocks) private returns (uint32 deadline) {
        deadline = uint32(block.number + blocks);
        d.stage = stage;
        d.deadline = deadline;
    }

    function _toReferee(uint256 disputeId, Dispute storage d) private returns (uint32 deadline) {
        deadline = _next(d, Stage.Referee, turnBlocks * REFEREE_TURNS);
        emit RefereeTurn(disputeId, d.step, d.hi, d.loHash, d.hiHash, deadline);
    }

    function _settle(uint256 disputeId, bool solverWins, bool byTimeout) private {
        Dispute storage d = disputes[disputeId];
        uint256 jobId = d.jobId;
        Job storage job = jobs[jobId];
        d.stage = Stage.Closed;
        job.openDisputes -= 1;
        uint256 slashed;
        address winner;
        address loser;
        if (solverWins) {
            (winner, loser) = (d.solver, d.challenger);
            slashed = d.bond; // the solver's commit stands and is paid at finalize
        } else {
            (winner, loser) = (d.challenger, d.solver);
            slashed = job.stakePerRole; // the solver's locked stake; its seat is freed
            roleOf[jobId][d.solver] = SLASHED; // it may not commit again
            job.seated -= 1;
            if (seats[jobId][d.solver].isFinal) job.committed -= 1;
            accounts[d.challenger].withdrawable += d.bond;
        }
        uint256 reward = slashed * WINNER_SHARE_BPS / 10_000;
        uint256 burnt = slashed - reward;
        accounts[winner].withdrawable += uint128(reward);
        emit DisputeResolved(disputeId, winner, loser, slashed, burnt, byTimeout);
        if (burnt > 0) {
            (bool sent,) = BURN_ADDRESS.call{value: burnt}("");
            require(sent, "burn failed");
        }
    }

    // ---------------------------------------------------------------- settlement

    /// After the window: pays every live final commit's solver and every verifier,
    /// unlocks their stakes (and a never-final seat's, unpaid) and refunds unused
    /// seats to the submitter. SOLVERS and VERIFIERS must list each live seat and
    /// verifier exactly once (clients read them from Committed / VerifierAccepted
    /// events); anyone may call.
    function finalize(uint256 jobId, address[] calldata solvers, address[] calldata verifiers) external {
        Job storage job = jobs[jobId];
        require(job.solverCount > 0, "no such job");
        uint8 flags = job.flags;
        require(flags & FINALIZED == 0, "job already finalized");
        require(job.openDisputes == 0, "a dispute is open");
        require(flags & ALL_FINAL != 0 || block.number > job.commitDeadline, "commit phase not over");
        require(block.number > _windowEnd(job), "challenge window not over");
        require(solvers.length == job.seated, "solver list must name every live commit");
        require(verifiers.length == job.verifiersAccepted, "verifier list must name every verifier");
        job.flags = flags | FINALIZED;
        uint128 unlock = job.stakePerRole;
        uint128 price = job.pricePerSolver;
        _paySolvers(jobId, solvers, unlock, price, job.committed == job.seated);
        (uint128 fee, uint256 verifierCount) =
            flags & HAS_SLOT_2 != 0 ? (uint128(job.verifierFee), uint256(job.verifierCount)) : (0, 0);
        for (uint256 i = 0; i < verifiers.length; ++i) {
            address verifier = verifiers[i];
            require(roleOf[jobId][verifier] == VERIFIER, "not a verifier of the job");
            delete roleOf[jobId][verifier];
            Account storage account = accounts[verifier];
            account.stake += unlock;
            account.withdrawable += fee;
        }
        uint256 refund =
            uint256(job.solverCount - job.committed) * price + (verifierCount - job.verifiersAccepted) * fee;
        if (refund > 0) accounts[job.submitter].withdrawable += uint128(refund);
        emit JobFinalized(jobId, solvers.length, verifiers.length, refund);
    }

    /// ALLFINAL: every seat is final, so no seat's flag needs reading.
    function _paySolvers(uint256 jobId, address[] calldata solvers, uint128 unlock, uint128 price, bool allFinal)
        private
    {
        for (uint256 i = 0; i < solvers.length; ++i) {
            address solver = solvers[i];
            require(uint256(roleOf[jobId][solver]) > 2, "not a live solver of the job");
            delete roleOf[jobId][solver]; // also stops a duplicate in the list
            Account storage account = accounts[solver];
            account.stake += unlock;
            if (allFinal || seats[jobId][solver].isFinal) account.withdrawable += price;
        }
    }

    // ---------------------------------------------------------------- views

    function getJob(uint256 jobId) external view returns (JobView memory v) {
        Job storage job = jobs[jobId];
        v.submitter = job.submitter;
        v.referee = job.referee == address(0) ? job.submitter : job.referee;
        v.solverCount = job.solverCount;
        v.verifierCount = job.verifierCount;
        v.pricePerSolver = job.pricePerSolver;
        v.verifierFee = job.verifierFee;
        v.stakePerRole = job.stakePerRole;
        v.commitDeadline = job.commitDeadline;
        v.challengeWindow = job.challengeWindow;
        v.lastCommitBlock = job.lastCommitBlock;
        v.committed = job.committed;
        v.verifiersAccepted = job.verifiersAccepted;
        v.openDisputes = job.openDisputes;
        v.finalized = job.flags & FINALIZED != 0;
        v.seated = job.seated;
        v.allFinal = job.flags & ALL_FINAL != 0;
    }

    function getDispute(uint256 disputeId) external view returns (DisputeView memory v) {
        Dispute storage d = disputes[disputeId];
        v.stage = d.stage;
        v.jobId = d.jobId;
        v.solver = d.solver;
        v.challenger = d.challenger;
        v.step = d.step;
        v.lo = d.lo;
        v.hi = d.hi;
        v.opCount = d.opCount;
        v.loHash = d.loHash;
        v.hiHash = d.hiHash;
        v.midHash = d.midHash;
        v.deadline = d.deadline;
        v.bond = d.bond;
    }

    /// The dispute over SOLVER's commit in the job (0: never challenged).
    function disputeOf(uint256 jobId, address solver) external view returns (uint256) {
        return seats[jobId][solver].disputeId;
    }

    /// The solver's live commit root (interim or final), or 0 (none, slashed, or paid
    /// at finalize).
    function commitOf(uint256 jobId, address solver) external view returns (bytes32) {
        bytes32 role = roleOf[jobId][solver];
        return uint256(role) > 2 ? role : bytes32(0);
    }

    /// The leaf count of the solver's commit and whether it is final.
    function commitInfo(uint256 jobId, address solver) external view returns (uint48 leafCount, bool isFinal) {
        Seat storage seat = seats[jobId][solver];
        return (seat.leafCount, seat.isFinal);
    }

    function isVerifier(uint256 jobId, address account) external view returns (bool) {
        return roleOf[jobId][account] == VERIFIER;
    }

    function nodeCount() external view returns (uint256) {
        return nodes.length;
    }

    function refereeBlocks() external view returns (uint256) {
        return turnBlocks * REFEREE_TURNS;
    }

    function stakeOf(address node) external view returns (uint256) {
        return accounts[node].stake;
    }

    function withdrawableOf(address account) external view returns (uint256) {
        return accounts[account].withdrawable;
    }
}
