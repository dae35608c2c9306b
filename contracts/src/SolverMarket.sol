// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title SolverMarket — stakes, escrow, commitments, bisection disputes and payouts
/// for solvernet jobs. Amounts are wei everywhere. docs/contracts.md states every rule,
/// role, deadline and trust assumption; this file keeps to it.
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

    // ---------------------------------------------------------------- jobs

    /// A job is two storage slots, three with a distinct referee or verifier seats: a
    /// post writes as few fresh slots as the job needs (each costs 22.1k gas).
    struct Job {
        // Slot 0: everything commit(), accept() and challenge() read and write.
        uint32 commitDeadline; // last block at which a solver may commit
        uint32 lastCommitBlock; // the challenge window runs from here
        uint32 challengeWindow; // blocks after the last commit
        uint88 stakePerRole; // locked from each solver and verifier until finalize
        uint8 flags; // FINALIZED | HAS_SLOT_2
        uint16 solverCount;
        uint16 committed; // live commits (a slashed commit is removed)
        uint16 verifiersAccepted;
        uint16 openDisputes;
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
    }

    uint8 private constant FINALIZED = 1;
    uint8 private constant HAS_SLOT_2 = 2;

    mapping(uint256 => Job) internal jobs;
    /// A participant's role in a job, one slot so commit() reads one word: 0 = none,
    /// SLASHED = a solver whose commit lost a dispute, VERIFIER, else the solver's root.
    mapping(uint256 => mapping(address => bytes32)) internal roleOf;
    bytes32 private constant SLASHED = bytes32(uint256(1));
    bytes32 private constant VERIFIER = bytes32(uint256(2));
    mapping(uint256 => mapping(address => uint256)) public disputeOf; // 0 = never challenged
    uint256 public jobCount;

    // ---------------------------------------------------------------- disputes

    enum Turn {
        None,
        Solver, // must post the state hash at the midpoint of [lo, hi]
        Challenger, // must say whether it agrees with that hash
        Referee, // range narrowed to one step: the referee rules
        Closed
    }

    struct Dispute {
        address challenger;
        uint64 deadline; // last block for the party whose turn it is
        Turn turn;
        address solver;
        uint48 lo; // both sides agree on the state after step lo
        uint48 hi; // they disagree on the state after step hi
        uint128 bond;
        uint64 jobId;
        bytes32 midHash; // the solver's claim for the state after step (lo+hi)/2
    }

    mapping(uint256 => Dispute) public disputes;
    uint256 public disputeCount;

    uint64 public immutable unbondingBlocks;
    uint64 public immutable turnBlocks;
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
    event Committed(uint256 indexed jobId, address indexed solver, bytes32 root);
    event Challenged(
        uint256 indexed jobId,
        uint256 indexed disputeId,
        address indexed solver,
        address challenger,
        uint48 lo,
        uint48 hi,
        uint256 bond
    );
    event MidpointClaimed(uint256 indexed disputeId, uint48 mid, bytes32 stateHash, uint64 deadline);
    event Bisected(uint256 indexed disputeId, uint48 lo, uint48 hi, uint64 deadline);
    /// The winner received slashed - burnt.
    event DisputeResolved(
        uint256 indexed disputeId, address indexed winner, address indexed loser, uint256 slashed, uint256 burnt, bool byTimeout
    );
    event JobFinalized(uint256 indexed jobId, uint256 solversPaid, uint256 verifiersPaid, uint256 refund);

    constructor(uint64 unbondingBlocks_, uint64 turnBlocks_) {
        require(unbondingBlocks_ > 0 && turnBlocks_ > 0, "delays must be > 0");
        unbondingBlocks = unbondingBlocks_;
        turnBlocks = turnBlocks_;
    }

    // ---------------------------------------------------------------- staking

    /// Binds a solvernet node id to the sender (once, for good) and stakes msg.value.
    function register(bytes32 nodeId) external payable {
        require(nodeId != bytes32(0), "node id is zero");
        require(nodeIdOf[msg.sender] == bytes32(0), "address already registered");
        require(ownerOfNode[nodeId] == address(0), "node id already bound");
        nodeIdOf[msg.sender] = nodeId;
        ownerOfNode[nodeId] = msg.sender;
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

    /// A staked node takes a verifier seat, locking stakePerRole until finalize.
    /// (A solver takes its seat by committing: one transaction instead of two.)
    function accept(uint256 jobId) external {
        Job storage job = jobs[jobId];
        require(job.solverCount > 0, "no such job");
        require(block.number <= job.commitDeadline && job.flags & FINALIZED == 0, "job closed for roles");
        require(job.verifiersAccepted < job.verifierCount, "verifier seats full");
        bytes32 role = roleOf[jobId][msg.sender];
        require(role == 0, role == VERIFIER ? "already a verifier" : "a solver cannot verify its own job");
        _lockStake(job.stakePerRole);
        roleOf[jobId][msg.sender] = VERIFIER;
        job.verifiersAccepted += 1;
        emit VerifierAccepted(jobId, msg.sender);
    }

    /// A staked node takes a solver seat and records the Merkle root of its work.
    function commit(uint256 jobId, bytes32 root) external {
        Job storage job = jobs[jobId];
        require(job.solverCount > 0, "no such job");
        require(uint256(root) > 2, "root is zero or reserved");
        require(block.number <= job.commitDeadline, "commit deadline passed");
        require(job.committed < job.solverCount, "solver seats full");
        bytes32 role = roleOf[jobId][msg.sender];
        require(
            role == 0,
            role == VERIFIER ? "a verifier cannot solve" : role == SLASHED ? "commit was disputed" : "already committed"
        );
        _lockStake(job.stakePerRole);
        roleOf[jobId][msg.sender] = root;
        job.committed += 1;
        job.lastCommitBlock = uint32(block.number);
        emit Committed(jobId, msg.sender, root);
    }

    function _lockStake(uint88 amount) private {
        Account storage account = accounts[msg.sender];
        // Stake exists only on registered nodes and amount > 0, so one read decides.
        if (account.stake < amount) {
            revert(nodeIdOf[msg.sender] == bytes32(0) ? "not a registered node" : "free stake below the job's stake");
        }
        account.stake -= amount;
    }

    // ---------------------------------------------------------------- disputes

    /// A verifier of the job disputes SOLVER's commit over steps (lo, hi], posting a
    /// bond of at least stakePerRole. One challenge per commit, within the window.
    function challenge(uint256 jobId, address solver, uint48 lo, uint48 hi)
        external
        payable
        returns (uint256 disputeId)
    {
        Job storage job = jobs[jobId];
        require(roleOf[jobId][msg.sender] == VERIFIER, "only a verifier of the job");
        require(uint256(roleOf[jobId][solver]) > 2, "no commit to challenge");
        require(disputeOf[jobId][solver] == 0, "commit already challenged");
        require(job.flags & FINALIZED == 0, "job finalized");
        require(block.number <= uint256(job.lastCommitBlock) + job.challengeWindow, "challenge window over");
        require(hi > lo, "empty step range");
        require(msg.value >= job.stakePerRole && msg.value > 0, "bond below the job's stake");
        disputeId = ++disputeCount;
        disputeOf[jobId][solver] = disputeId;
        job.openDisputes += 1;
        Dispute storage d = disputes[disputeId];
        d.challenger = msg.sender;
        d.solver = solver;
        d.lo = lo;
        d.hi = hi;
        d.bond = uint128(msg.value);
        d.jobId = uint64(jobId);
        if (hi - lo == 1) {
            d.turn = Turn.Referee;
        } else {
            d.turn = Turn.Solver;
            d.deadline = uint64(block.number) + turnBlocks;
        }
        emit Challenged(jobId, disputeId, solver, msg.sender, lo, hi, msg.value);
    }

    /// Solver's round: its state hash after the midpoint step of the open range.
    function claimMidpoint(uint256 disputeId, bytes32 stateHash) external {
        Dispute storage d = disputes[disputeId];
        require(d.turn == Turn.Solver, "not the solver's turn");
        require(msg.sender == d.solver, "only the disputed solver");
        require(block.number <= d.deadline, "turn deadline passed");
        d.midHash = stateHash;
        d.turn = Turn.Challenger;
        uint64 deadline = uint64(block.number) + turnBlocks;
        d.deadline = deadline;
        emit MidpointClaimed(disputeId, (d.lo + d.hi) / 2, stateHash, deadline);
    }

    /// Challenger's round: agreeing with the midpoint moves lo up, disagreeing moves
    /// hi down. At one step apart the referee rules.
    function bisect(uint256 disputeId, bool agree) external {
        Dispute storage d = disputes[disputeId];
        require(d.turn == Turn.Challenger, "not the challenger's turn");
        require(msg.sender == d.challenger, "only the challenger");
        require(block.number <= d.deadline, "turn deadline passed");
        uint48 mid = (d.lo + d.hi) / 2;
        if (agree) d.lo = mid;
        else d.hi = mid;
        uint64 deadline;
        if (d.hi - d.lo == 1) {
            d.turn = Turn.Referee;
        } else {
            d.turn = Turn.Solver;
            deadline = uint64(block.number) + turnBlocks;
        }
        d.deadline = deadline;
        emit Bisected(disputeId, d.lo, d.hi, deadline);
    }

    /// The job's referee rules on the one disputed step (hi) once the range is narrowed.
    function resolve(uint256 disputeId, bool solverWins) external {
        Dispute storage d = disputes[disputeId];
        require(d.turn == Turn.Referee, "dispute not narrowed to one step");
        Job storage job = jobs[d.jobId];
        address referee = job.referee;
        require(msg.sender == (referee == address(0) ? job.submitter : referee), "only the job's referee");
        _settle(disputeId, solverWins, false);
    }

    /// Anyone may end a dispute whose party missed its turn: that party loses.
    function timeout(uint256 disputeId) external {
        Dispute storage d = disputes[disputeId];
        require(d.turn == Turn.Solver || d.turn == Turn.Challenger, "no turn to time out");
        require(block.number > d.deadline, "turn deadline not passed");
        _settle(disputeId, d.turn == Turn.Challenger, true);
    }

    function _settle(uint256 disputeId, bool solverWins, bool byTimeout) private {
        Dispute storage d = disputes[disputeId];
        uint256 jobId = d.jobId;
        Job storage job = jobs[jobId];
        d.turn = Turn.Closed;
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
            job.committed -= 1;
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

    /// After the window: pays every live commit's solver and every verifier, unlocks
    /// their stakes and refunds unused seats to the submitter. SOLVERS and VERIFIERS
    /// must list each live participant exactly once (clients read them from
    /// Committed / VerifierAccepted events); anyone may call.
    function finalize(uint256 jobId, address[] calldata solvers, address[] calldata verifiers) external {
        Job storage job = jobs[jobId];
        require(job.solverCount > 0, "no such job");
        uint8 flags = job.flags;
        require(flags & FINALIZED == 0, "job already finalized");
        require(job.openDisputes == 0, "a dispute is open");
        require(job.committed == job.solverCount || block.number > job.commitDeadline, "commit phase not over");
        require(block.number > uint256(job.lastCommitBlock) + job.challengeWindow, "challenge window not over");
        require(solvers.length == job.committed, "solver list must name every live commit");
        require(verifiers.length == job.verifiersAccepted, "verifier list must name every verifier");
        job.flags = flags | FINALIZED;
        uint128 unlock = job.stakePerRole;
        uint128 price = job.pricePerSolver;
        for (uint256 i = 0; i < solvers.length; ++i) {
            address solver = solvers[i];
            require(uint256(roleOf[jobId][solver]) > 2, "not a live solver of the job");
            delete roleOf[jobId][solver]; // also stops a duplicate in the list
            Account storage account = accounts[solver];
            account.stake += unlock;
            account.withdrawable += price;
        }
        (uint128 fee, uint256 verifierCount) = flags & HAS_SLOT_2 != 0 ? (uint128(job.verifierFee), uint256(job.verifierCount)) : (0, 0);
        for (uint256 i = 0; i < verifiers.length; ++i) {
            address verifier = verifiers[i];
            require(roleOf[jobId][verifier] == VERIFIER, "not a verifier of the job");
            delete roleOf[jobId][verifier];
            Account storage account = accounts[verifier];
            account.stake += unlock;
            account.withdrawable += fee;
        }
        uint256 refund = uint256(job.solverCount - job.committed) * price
            + (verifierCount - job.verifiersAccepted) * fee;
        if (refund > 0) accounts[job.submitter].withdrawable += uint128(refund);
        emit JobFinalized(jobId, solvers.length, verifiers.length, refund);
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
    }

    /// The solver's live commit root, or 0 (none, slashed, or paid at finalize).
    function commitOf(uint256 jobId, address solver) external view returns (bytes32) {
        bytes32 role = roleOf[jobId][solver];
        return uint256(role) > 2 ? role : bytes32(0);
    }

    function isVerifier(uint256 jobId, address account) external view returns (bool) {
        return roleOf[jobId][account] == VERIFIER;
    }

    function stakeOf(address node) external view returns (uint256) {
        return accounts[node].stake;
    }

    function withdrawableOf(address account) external view returns (uint256) {
        return accounts[account].withdrawable;
    }
}
