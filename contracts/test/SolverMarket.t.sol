// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {SolverMarket} from "../src/SolverMarket.sol";
import {MerkleTree} from "./MerkleTree.sol";
import {TestBase} from "./Vm.sol";

/// Unit and fuzz tests: every function's effect, every turn and deadline of a dispute,
/// and every forbidden move's revert.
contract SolverMarketTest is TestBase {
    SolverMarket market;
    address submitter = address(0x5001);
    address referee = address(0x5002);
    address solverA = address(0xA1);
    address solverB = address(0xA2);
    address verifier = address(0xB1);
    address stranger = address(0xC1);
    uint88 constant STAKE = 1 ether;
    uint96 constant PRICE = 2 ether;
    uint80 constant FEE = 0.5 ether;
    uint48 constant N = 9; // leaves per commitment: steps 0..8
    uint64 constant TURN = 5;

    function setUp() public {
        market = new SolverMarket(10, TURN);
        address[4] memory nodes = [solverA, solverB, verifier, stranger];
        for (uint256 i = 0; i < nodes.length; ++i) {
            vm.deal(nodes[i], 100 ether);
            if (nodes[i] == stranger) continue;
            vm.prank(nodes[i]);
            market.register{value: 10 ether}(bytes32(uint256(uint160(nodes[i]))));
        }
        vm.deal(submitter, 100 ether);
        vm.deal(stranger, 100 ether);
    }

    // ------------------------------------------------------------ helpers

    /// A solver's step leaves: leaf t = K(who ‖ t).
    function _leaves(address who, uint256 n) internal pure returns (bytes32[] memory leaves) {
        leaves = new bytes32[](n);
        for (uint256 t = 0; t < n; ++t) leaves[t] = keccak256(abi.encodePacked(who, t));
    }

    function _commit(uint256 jobId, address who) internal {
        vm.prank(who);
        market.commit(jobId, MerkleTree.root(_leaves(who, N)), N, true);
    }

    function _post() internal returns (uint256) {
        vm.prank(submitter);
        return market.postJob{value: 2 * PRICE + FEE}(2, 1, PRICE, FEE, STAKE, 20, 10, referee, bytes32("spec"));
    }

    /// Both solvers commit final; the seed block is mined; the verifier (the only
    /// eligible node) takes the seat.
    function _postAndCommit() internal returns (uint256 jobId) {
        jobId = _post();
        _commit(jobId, solverA);
        _commit(jobId, solverB);
        vm.roll(block.number + 2);
        vm.prank(verifier);
        market.accept(jobId);
    }

    function _lists() internal view returns (address[] memory solvers, address[] memory verifiers) {
        solvers = new address[](2);
        solvers[0] = solverA;
        solvers[1] = solverB;
        verifiers = new address[](1);
        verifiers[0] = verifier;
    }

    function _dispute(uint256 id) internal view returns (SolverMarket.DisputeView memory) {
        return market.getDispute(id);
    }

    function _stage(uint256 id) internal view returns (SolverMarket.Stage) {
        return market.getDispute(id).stage;
    }

    // ------------------------------------------------------------ staking

    function testRegisterBindsNodeIdAndStakes() public view {
        assertEq(market.stakeOf(solverA), 10 ether, "stake");
        assertEq(market.nodeIdOf(solverA), bytes32(uint256(uint160(solverA))), "node id");
        assertTrue(market.ownerOfNode(bytes32(uint256(uint160(solverA)))) == solverA, "owner");
    }

    function testRegisterReverts() public {
        vm.prank(stranger);
        vm.expectRevert(bytes("node id is zero"));
        market.register(bytes32(0));
        vm.prank(stranger);
        vm.expectRevert(bytes("node id already bound"));
        market.register(bytes32(uint256(uint160(solverA))));
        vm.prank(solverA);
        vm.expectRevert(bytes("address already registered"));
        market.register(bytes32("other"));
    }

    function testStakeRequiresRegistration() public {
        vm.prank(stranger);
        vm.expectRevert(bytes("not a registered node"));
        market.stake{value: 1 ether}();
        vm.prank(solverA);
        vm.expectRevert(bytes("stake must be > 0"));
        market.stake();
        vm.prank(solverA);
        market.stake{value: 1 ether}();
        assertEq(market.stakeOf(solverA), 11 ether, "stake after top-up");
    }

    function testUnstakeWaitsForUnbonding() public {
        vm.prank(solverA);
        market.unstake(4 ether);
        assertEq(market.stakeOf(solverA), 6 ether, "free stake");
        vm.prank(solverA);
        vm.expectRevert(bytes("nothing to withdraw"));
        market.withdraw();
        vm.roll(block.number + 10);
        uint256 before = solverA.balance;
        vm.prank(solverA);
        market.withdraw();
        assertEq(solverA.balance - before, 4 ether, "unbonded stake paid");
    }

    function testUnstakeReverts() public {
        vm.prank(solverA);
        vm.expectRevert(bytes("amount exceeds free stake"));
        market.unstake(11 ether);
        vm.prank(solverA);
        vm.expectRevert(bytes("amount must be > 0"));
        market.unstake(0);
    }

    function testLockedStakeCannotBeUnstaked() public {
        uint256 jobId = _post();
        vm.prank(solverA);
        market.commit(jobId, bytes32("r"), N, true);
        vm.prank(solverA);
        vm.expectRevert(bytes("amount exceeds free stake"));
        market.unstake(10 ether);
    }

    // ------------------------------------------------------------ jobs

    function testPostJobReverts() public {
        vm.startPrank(submitter);
        vm.expectRevert(bytes("value must equal escrow"));
        market.postJob{value: 1}(2, 1, PRICE, FEE, STAKE, 20, 10, referee, 0);
        vm.expectRevert(bytes("stake per role must be > 0"));
        market.postJob(1, 0, 0, 0, 0, 20, 10, referee, 0);
        vm.expectRevert(bytes("solver count must be > 0"));
        market.postJob(0, 1, PRICE, FEE, STAKE, 20, 10, referee, 0);
        vm.expectRevert(bytes("verifier count must be <= 255"));
        market.postJob(1, 256, 0, 0, STAKE, 20, 10, referee, 0);
        vm.expectRevert(bytes("commit blocks must be > 0"));
        market.postJob(1, 0, 0, 0, STAKE, 0, 10, referee, 0);
        vm.expectRevert(bytes("challenge window must be > 0"));
        market.postJob(1, 0, 0, 0, STAKE, 20, 0, referee, 0);
        vm.roll(type(uint32).max - 25);
        vm.expectRevert(bytes("deadlines beyond block 2^32"));
        market.postJob(1, 0, 0, 0, STAKE, 20, 10, referee, 0);
        vm.stopPrank();
    }

    function testGetJobReturnsTheTermsAndProgress() public {
        uint256 jobId = _post();
        _commit(jobId, solverA);
        SolverMarket.JobView memory job = market.getJob(jobId);
        assertTrue(job.submitter == submitter && job.referee == referee, "parties");
        assertEq(job.solverCount, 2, "solvers");
        assertEq(job.verifierCount, 1, "verifiers");
        assertEq(job.pricePerSolver, PRICE, "price");
        assertEq(job.verifierFee, FEE, "fee");
        assertEq(job.stakePerRole, STAKE, "stake");
        assertEq(job.commitDeadline, block.number + 20, "commit deadline");
        assertEq(job.challengeWindow, 10, "window");
        assertEq(job.lastCommitBlock, block.number, "last commit");
        assertEq(job.committed, 1, "committed");
        assertEq(job.seated, 1, "seated");
        assertTrue(!job.finalized && !job.allFinal, "open");
    }

    /// Referee 0 (or the submitter's own address) means the submitter referees.
    function testZeroRefereeMeansTheSubmitter() public {
        vm.prank(submitter);
        uint256 jobId = market.postJob{value: PRICE}(1, 0, PRICE, 0, STAKE, 20, 10, address(0), 0);
        assertTrue(market.getJob(jobId).referee == submitter, "submitter referees");
        vm.prank(submitter);
        uint256 other = market.postJob{value: PRICE}(1, 0, PRICE, 0, STAKE, 20, 10, submitter, 0);
        assertTrue(market.getJob(other).referee == submitter, "named as itself");
        vm.prank(submitter);
        uint256 seated = market.postJob{value: PRICE + FEE}(1, 1, PRICE, FEE, STAKE, 20, 10, address(0), 0);
        _commit(seated, solverB);
        vm.roll(block.number + 2);
        address chosen = market.selectedVerifier(seated, 0); // solverA or the verifier
        vm.prank(chosen);
        market.accept(seated);
        bytes32[] memory leaves = _leaves(solverB, N);
        vm.prank(chosen);
        uint256 id = market.challenge{value: STAKE}(
            seated, solverB, 4, leaves[4], MerkleTree.proof(leaves, 4), 5, leaves[5], MerkleTree.proof(leaves, 5)
        );
        _postOps(id, 1, market.opsStart(leaves[4]));
        vm.prank(referee);
        vm.expectRevert(bytes("only the job's referee"));
        market.resolve(id, true);
        vm.prank(submitter);
        market.resolve(id, true);
        assertTrue(_stage(id) == SolverMarket.Stage.Closed, "closed");
    }

    function testAcceptAfterAnEarlyFinalizeReverts() public {
        vm.prank(submitter);
        uint256 jobId = market.postJob{value: PRICE + FEE}(1, 1, PRICE, FEE, STAKE, 100, 3, referee, 0);
        _commit(jobId, solverA);
        vm.roll(block.number + 4); // window over, commit deadline not: every seat is final
        address[] memory solvers = new address[](1);
        solvers[0] = solverA;
        market.finalize(jobId, solvers, new address[](0));
        vm.prank(verifier);
        vm.expectRevert(bytes("job closed for roles"));
        market.accept(jobId);
        assertEq(market.stakeOf(verifier), 10 ether, "no stake locked in a finalized job");
        assertEq(market.withdrawableOf(submitter), FEE, "the unused verifier seat refunded");
    }

    function testCommitReverts() public {
        uint256 jobId = _post();
        vm.prank(stranger);
        vm.expectRevert(bytes("not a registered node"));
        market.commit(jobId, bytes32("r"), N, true);
        vm.prank(solverA);
        vm.expectRevert(bytes("root is zero or reserved"));
        market.commit(jobId, 0, N, true);
        vm.prank(solverA);
        vm.expectRevert(bytes("leaf count must be > 0"));
        market.commit(jobId, bytes32("r"), 0, true);
        vm.prank(solverA);
        vm.expectRevert(bytes("no such job"));
        market.commit(99, bytes32("r"), N, true);
        vm.prank(solverA);
        market.commit(jobId, bytes32("r"), N, true);
        vm.prank(solverA);
        vm.expectRevert(bytes("already committed"));
        market.commit(jobId, bytes32("r2"), N + 1, true);
        vm.prank(verifier);
        market.commit(jobId, bytes32("r"), N, false);
        vm.prank(stranger);
        market.register(bytes32("stranger"));
        vm.prank(stranger);
        market.stake{value: 5 ether}();
        vm.prank(stranger);
        vm.expectRevert(bytes("solver seats full"));
        market.commit(jobId, bytes32("r"), N, true);
    }

    /// Interim commits replace the root while the leaf count grows; the final one
    /// counts; once every seat is final no commit is taken.
    function testInterimCommitsThenFinal() public {
        uint256 jobId = _post();
        vm.prank(solverA);
        market.commit(jobId, bytes32("interim-1"), 3, false);
        assertEq(market.stakeOf(solverA), 9 ether, "seat taken, stake locked once");
        vm.prank(solverA);
        vm.expectRevert(bytes("leaf count must grow"));
        market.commit(jobId, bytes32("interim-2"), 3, false);
        vm.roll(block.number + 1);
        vm.prank(solverA);
        market.commit(jobId, bytes32("interim-2"), 6, false);
        assertEq(market.commitOf(jobId, solverA), bytes32("interim-2"), "root replaced");
        assertEq(market.stakeOf(solverA), 9 ether, "no second lock");
        SolverMarket.JobView memory job = market.getJob(jobId);
        assertEq(job.committed, 0, "no final commit yet");
        assertEq(job.seated, 1, "one seat");
        vm.expectRevert(bytes("commits not final yet"));
        market.verifierSeed(jobId);
        vm.prank(solverA);
        market.commit(jobId, bytes32("final"), 9, true);
        (uint48 count, bool isFinal) = market.commitInfo(jobId, solverA);
        assertEq(count, 9, "leaf count");
        assertTrue(isFinal, "final");
        vm.prank(solverA);
        vm.expectRevert(bytes("already committed"));
        market.commit(jobId, bytes32("after"), 10, true);
        _commit(jobId, solverB);
        assertTrue(market.getJob(jobId).allFinal, "all final");
        vm.prank(verifier);
        vm.expectRevert(bytes("commit deadline passed"));
        market.commit(jobId, bytes32("late"), N, true);
    }

    function testCommitAfterDeadlineReverts() public {
        uint256 jobId = _post();
        vm.roll(block.number + 21);
        vm.prank(solverA);
        vm.expectRevert(bytes("commit deadline passed"));
        market.commit(jobId, bytes32("r"), N, true);
    }

    function testCommitNeedsEnoughFreeStake() public {
        vm.prank(submitter);
        uint256 jobId = market.postJob(1, 0, 0, 0, 50 ether, 20, 10, referee, 0);
        vm.prank(solverA);
        vm.expectRevert(bytes("free stake below the job's stake"));
        market.commit(jobId, bytes32("r"), N, true);
    }

    // ------------------------------------------------------------ verifier choice

    /// Nobody knows the seed before the last final commit: it reverts (and so does
    /// accept) until the block after that commit is mined, then it is K(that block's
    /// hash ‖ jobId).
    function testSeedIsUnknownBeforeTheLastCommit() public {
        uint256 jobId = _post();
        _commit(jobId, solverA);
        vm.expectRevert(bytes("commits not final yet"));
        market.verifierSeed(jobId);
        vm.prank(verifier);
        vm.expectRevert(bytes("commits not final yet"));
        market.accept(jobId);
        vm.roll(block.number + 1);
        _commit(jobId, solverB);
        uint256 last = block.number;
        vm.expectRevert(bytes("seed block not mined yet"));
        market.verifierSeed(jobId);
        vm.roll(last + 1);
        vm.expectRevert(bytes("seed block not mined yet"));
        market.verifierSeed(jobId);
        vm.prank(verifier);
        vm.expectRevert(bytes("seed block not mined yet"));
        market.accept(jobId);
        vm.roll(last + 2);
        assertEq(market.verifierSeed(jobId), keccak256(abi.encodePacked(blockhash(last + 1), jobId)), "seed");
        vm.prank(verifier);
        market.accept(jobId);
        assertTrue(market.isVerifier(jobId, verifier), "accepted");
        vm.prank(verifier);
        vm.expectRevert(bytes("verifier seats full"));
        market.accept(jobId);
    }

    /// With seats left empty, the seed is the block after the commit deadline.
    function testSeedAfterTheCommitDeadline() public {
        uint256 jobId = _post();
        _commit(jobId, solverA);
        uint256 deadline = market.getJob(jobId).commitDeadline;
        vm.roll(deadline);
        vm.expectRevert(bytes("commits not final yet"));
        market.verifierSeed(jobId);
        vm.roll(deadline + 2);
        assertEq(market.verifierSeed(jobId), keccak256(abi.encodePacked(blockhash(deadline + 1), jobId)), "seed");
        assertTrue(market.selectedVerifier(jobId, 0) != solverA, "never the solver");
    }

    /// Only the selected node may accept; a selected node that stays silent for
    /// turnBlocks is passed over for the next eligible one. Solvers, verifiers and
    /// nodes short of stake are never selected.
    function testOnlyTheSelectedVerifierMayAccept() public {
        address[5] memory pool = [address(0xD1), address(0xD2), address(0xD3), address(0xD4), address(0xD5)];
        for (uint256 i = 0; i < pool.length; ++i) {
            vm.deal(pool[i], 10 ether);
            vm.prank(pool[i]);
            market.register{value: i == 4 ? 0.5 ether : 2 ether}(bytes32(uint256(0xD0 + i)));
        }
        assertEq(market.nodeCount(), 8, "pool");
        vm.prank(submitter);
        uint256 jobId = market.postJob{value: 2 * PRICE + 2 * FEE}(2, 2, PRICE, FEE, STAKE, 20, 200, referee, 0);
        _commit(jobId, solverA);
        _commit(jobId, solverB);
        uint256 seedBlock = block.number + 1;
        vm.roll(seedBlock + 1);
        address first = market.selectedVerifier(jobId, 0);
        assertTrue(first != address(0) && first != solverA && first != solverB && first != pool[4], "eligible");
        address other = first == verifier ? pool[0] : verifier;
        vm.prank(other);
        vm.expectRevert(bytes("not the selected verifier"));
        market.accept(jobId);
        // Silent for a turn: the next candidate's turn.
        vm.roll(seedBlock + 1 + TURN);
        address second = market.selectedVerifier(jobId, 0);
        assertTrue(second != first, "passed over");
        vm.prank(first);
        vm.expectRevert(bytes("not the selected verifier"));
        market.accept(jobId);
        vm.prank(second);
        market.accept(jobId);
        // The referee never verifies the job it referees (it would rule its own dispute).
        vm.prank(referee);
        market.register{value: 0}(bytes32("referee"));
        vm.deal(referee, 10 ether);
        vm.prank(referee);
        market.stake{value: 5 ether}();
        for (uint256 k = 0; k < 12; ++k) {
            vm.roll(block.number + TURN);
            assertTrue(market.selectedVerifier(jobId, 1) != referee, "never the referee");
        }
        address third = market.selectedVerifier(jobId, 1);
        assertTrue(third != second && third != solverA && third != solverB && third != pool[4], "seat 2 eligible");
        vm.prank(third);
        market.accept(jobId);
        assertEq(market.getJob(jobId).verifiersAccepted, 2, "both seats");
    }

    function testHonestJobPaysAndUnlocks() public {
        uint256 jobId = _postAndCommit();
        assertEq(market.stakeOf(solverA), 9 ether, "stake locked");
        (address[] memory solvers, address[] memory verifiers) = _lists();
        vm.expectRevert(bytes("challenge window not over"));
        market.finalize(jobId, solvers, verifiers);
        vm.roll(block.number + 11);
        market.finalize(jobId, solvers, verifiers);
        assertEq(market.stakeOf(solverA), 10 ether, "stake unlocked");
        assertEq(market.withdrawableOf(solverA), PRICE, "solver paid");
        assertEq(market.withdrawableOf(verifier), FEE, "verifier paid");
        assertEq(market.withdrawableOf(submitter), 0, "nothing refunded");
        vm.expectRevert(bytes("job already finalized"));
        market.finalize(jobId, solvers, verifiers);
        uint256 before = solverA.balance;
        vm.prank(solverA);
        market.withdraw();
        assertEq(solverA.balance - before, PRICE, "withdrawn");
    }

    /// A seat that never committed final is unlocked at finalize but not paid.
    function testNeverFinalSeatIsUnlockedUnpaid() public {
        uint256 jobId = _post();
        _commit(jobId, solverA);
        vm.prank(solverB);
        market.commit(jobId, bytes32("interim"), 4, false);
        vm.roll(block.number + 31);
        (address[] memory solvers,) = _lists();
        market.finalize(jobId, solvers, new address[](0));
        assertEq(market.withdrawableOf(solverB), 0, "interim seat unpaid");
        assertEq(market.stakeOf(solverB), 10 ether, "but unlocked");
        assertEq(market.withdrawableOf(solverA), PRICE, "final seat paid");
        assertEq(market.withdrawableOf(submitter), PRICE + FEE, "unpaid seats refunded");
    }

    function testFinalizeRejectsBadLists() public {
        uint256 jobId = _postAndCommit();
        vm.roll(block.number + 11);
        (address[] memory solvers, address[] memory verifiers) = _lists();
        solvers[1] = solverA;
        vm.expectRevert(bytes("not a live solver of the job"));
        market.finalize(jobId, solvers, verifiers);
        address[] memory one = new address[](1);
        one[0] = solverA;
        vm.expectRevert(bytes("solver list must name every live commit"));
        market.finalize(jobId, one, verifiers);
        (solvers,) = _lists();
        verifiers[0] = stranger;
        vm.expectRevert(bytes("not a verifier of the job"));
        market.finalize(jobId, solvers, verifiers);
    }

    function testEarlyFinalizeRevertsWhileSeatsOpen() public {
        uint256 jobId = _post();
        _commit(jobId, solverA);
        vm.roll(block.number + 11);
        address[] memory solvers = new address[](1);
        solvers[0] = solverA;
        vm.expectRevert(bytes("commit phase not over"));
        market.finalize(jobId, solvers, new address[](0));
        vm.roll(block.number + 10); // past the deadline, not its window
        vm.expectRevert(bytes("challenge window not over"));
        market.finalize(jobId, solvers, new address[](0));
        vm.roll(block.number + 10);
        market.finalize(jobId, solvers, new address[](0));
        assertEq(market.withdrawableOf(submitter), PRICE + FEE, "unused seats refunded");
    }

    // ------------------------------------------------------------ Merkle proofs

    /// A fixed vector shared with tests/chain (C++ core/merkle.cpp, MerkleHash::keccak256)
    /// and computed a third time with js-sha3: leaf t = K(uint256 t), t = 0..4.
    function testMerkleVectorMatchesCpp() public view {
        bytes32[] memory leaves = new bytes32[](5);
        for (uint256 t = 0; t < 5; ++t) leaves[t] = keccak256(abi.encodePacked(t));
        bytes32 root = 0xe9f03fd6cde449589c5ae1a7372890d88446d3dbcd1b5301da3ea99f6920d219;
        assertEq(MerkleTree.root(leaves), root, "root");
        bytes32[] memory proof3 = new bytes32[](3);
        proof3[0] = 0x210a0ee75c46d1c8fb508605584c276bec6f4735d7ce19240d7d496ce976e0ca;
        proof3[1] = 0x61c40257bd5978001c0f6f1747fbccdffcfe3609e95e369bfa67c33f50a508ac;
        proof3[2] = 0x786148dd307b9413b66143d77f7b9467c8988b949ad78f00f204904a1aee5916;
        bytes32[] memory proof4 = new bytes32[](1); // carried up twice: one sibling
        proof4[0] = 0x25a6df6fcae202696e784a1594551a6683a440d438b785b11a59d653cf1dfa3a;
        assertTrue(market.verifyLeaf(root, 5, 3, leaves[3], proof3), "leaf 3");
        assertTrue(market.verifyLeaf(root, 5, 4, leaves[4], proof4), "leaf 4");
        assertEq(
            market.opsStart(leaves[3]), 0x28ee525e00f5646fd7bcba5c1cddf5d4ee32ced88cbb56d9951da2e6a8a5b3cf, "r_0"
        );
        bytes32 record = market.commitRecordHash(
            keccak256("state-x"), keccak256("inbound-x"), keccak256("outbound-x"), leaves[4]
        );
        assertEq(record, 0x215943cf19c03771fa1a75e6491a179852c9135ed0ad31cd0c6fc29900464362, "commit record");
    }

    /// Forged proofs: a wrong sibling, a wrong index, an index past the leaf count, a
    /// wrong leaf count, a sibling short or extra.
    function testForgedProofsAreRejected() public view {
        bytes32[] memory leaves = _leaves(solverA, 6);
        bytes32 root = MerkleTree.root(leaves);
        bytes32[] memory proof = MerkleTree.proof(leaves, 2);
        assertTrue(market.verifyLeaf(root, 6, 2, leaves[2], proof), "honest");
        assertTrue(!market.verifyLeaf(root, 6, 3, leaves[2], proof), "wrong index");
        assertTrue(!market.verifyLeaf(root, 6, 6, leaves[2], proof), "index = count");
        assertTrue(!market.verifyLeaf(root, 4, 2, leaves[2], proof), "wrong count");
        bytes32[] memory proof5 = MerkleTree.proof(leaves, 5); // index 5 of 6: level 1 carried
        assertTrue(market.verifyLeaf(root, 6, 5, leaves[5], proof5), "last leaf");
        assertTrue(!market.verifyLeaf(root, 7, 5, leaves[5], proof5), "count one more");
        assertTrue(!market.verifyLeaf(root, 6, 2, leaves[3], proof), "wrong leaf");
        bytes32[] memory forged = MerkleTree.proof(leaves, 2);
        forged[1] = bytes32("forged");
        assertTrue(!market.verifyLeaf(root, 6, 2, leaves[2], forged), "wrong sibling");
        bytes32[] memory shorter = new bytes32[](proof.length - 1);
        for (uint256 i = 0; i < shorter.length; ++i) shorter[i] = proof[i];
        assertTrue(!market.verifyLeaf(root, 6, 2, leaves[2], shorter), "sibling missing");
        bytes32[] memory longer = new bytes32[](proof.length + 1);
        for (uint256 i = 0; i < proof.length; ++i) longer[i] = proof[i];
        assertTrue(!market.verifyLeaf(root, 6, 2, leaves[2], longer), "sibling extra");
        // A leaf node passed as a leaf: the 0x00 prefix keeps levels apart.
        assertTrue(!market.verifyLeaf(root, 6, 2, MerkleTree.leafNode(leaves[2]), proof), "node as leaf");
    }

    function testFuzzProofsOfEveryTreeShape(uint16 n, uint16 index) public view {
        n = uint16(bound(n, 1, 300));
        index = uint16(index % n);
        bytes32[] memory leaves = _leaves(solverB, n);
        bytes32[][] memory levels = MerkleTree.levels(leaves);
        bytes32 root = levels[levels.length - 1][0];
        bytes32[] memory proof = MerkleTree.proofFrom(levels, index);
        assertTrue(market.verifyLeaf(root, n, index, leaves[index], proof), "honest proof");
        assertTrue(!market.verifyLeaf(root, n, index, leaves[(index + 1) % n] ^ bytes32(uint256(1)), proof), "leaf");
        if (n > 1) assertTrue(!market.verifyLeaf(root, n, (index + 1) % n, leaves[index], proof), "index");
    }

    // ------------------------------------------------------------ disputes

    function _challenge(uint256 jobId, uint48 lo, uint48 hi) internal returns (uint256 id) {
        bytes32[] memory leaves = _leaves(solverA, N);
        vm.prank(verifier);
        id = market.challenge{value: STAKE}(
            jobId, solverA, lo, leaves[lo], MerkleTree.proof(leaves, lo), hi, leaves[hi], MerkleTree.proof(leaves, hi)
        );
    }

    /// The solver's step turn: its leaf at the midpoint, with proof.
    function _claimLeaf(uint256 id) internal {
        SolverMarket.DisputeView memory d = _dispute(id);
        uint256 mid = (uint256(d.lo) + d.hi) / 2;
        bytes32[] memory leaves = _leaves(d.solver, N);
        vm.prank(d.solver);
        market.claimLeaf(id, leaves[mid], MerkleTree.proof(leaves, mid));
    }

    function _postOps(uint256 id, uint48 m, bytes32 rPrev) internal {
        vm.prank(_dispute(id).solver);
        market.postOps(id, m, rPrev, bytes32("state"), bytes32("in"), bytes32("out"));
    }

    function _bisect(uint256 id, bool agree) internal {
        vm.prank(verifier);
        market.bisect(id, agree);
    }

    function testChallengeReverts() public {
        uint256 jobId = _postAndCommit();
        bytes32[] memory leaves = _leaves(solverA, N);
        bytes32[] memory p0 = MerkleTree.proof(leaves, 0);
        bytes32[] memory p8 = MerkleTree.proof(leaves, 8);
        vm.prank(stranger);
        vm.expectRevert(bytes("only a verifier of the job"));
        market.challenge{value: STAKE}(jobId, solverA, 0, leaves[0], p0, 8, leaves[8], p8);
        vm.prank(verifier);
        vm.expectRevert(bytes("bond below the job's stake"));
        market.challenge{value: 1}(jobId, solverA, 0, leaves[0], p0, 8, leaves[8], p8);
        vm.prank(verifier);
        vm.expectRevert(bytes("empty step range"));
        market.challenge{value: STAKE}(jobId, solverA, 8, leaves[8], p8, 8, leaves[8], p8);
        vm.prank(verifier);
        vm.expectRevert(bytes("leaf index beyond the commitment"));
        market.challenge{value: STAKE}(jobId, solverA, 0, leaves[0], p0, 9, leaves[8], p8);
        vm.prank(verifier);
        vm.expectRevert(bytes("bad Merkle proof"));
        market.challenge{value: STAKE}(jobId, solverA, 0, leaves[0], p0, 8, leaves[7], p8);
        vm.prank(verifier);
        vm.expectRevert(bytes("bad Merkle proof"));
        market.challenge{value: STAKE}(jobId, solverA, 1, leaves[0], p0, 8, leaves[8], p8);
        vm.prank(verifier);
        vm.expectRevert(bytes("no commit to challenge"));
        market.challenge{value: STAKE}(jobId, stranger, 0, leaves[0], p0, 8, leaves[8], p8);
        uint256 id = _challenge(jobId, 0, 8);
        assertEq(market.disputeOf(jobId, solverA), id, "dispute of the commit");
        vm.prank(verifier);
        vm.expectRevert(bytes("commit already challenged"));
        market.challenge{value: STAKE}(jobId, solverA, 0, leaves[0], p0, 8, leaves[8], p8);
        (address[] memory solvers, address[] memory verifiers) = _lists();
        vm.roll(block.number + 11);
        vm.expectRevert(bytes("a dispute is open"));
        market.finalize(jobId, solvers, verifiers);
    }

    function testChallengeAfterWindowReverts() public {
        uint256 jobId = _postAndCommit();
        vm.roll(block.number + 11);
        bytes32[] memory leaves = _leaves(solverA, N);
        vm.prank(verifier);
        vm.expectRevert(bytes("challenge window over"));
        market.challenge{value: STAKE}(
            jobId, solverA, 0, leaves[0], MerkleTree.proof(leaves, 0), 8, leaves[8], MerkleTree.proof(leaves, 8)
        );
    }

    /// Every turn of both phases, out-of-turn moves refused, to the referee's ruling.
    function testTwoPhaseDisputeThenRefereeSlashesSolver() public {
        uint256 jobId = _postAndCommit();
        uint256 id = _challenge(jobId, 0, 8);
        uint256 burnBefore = address(0xdEaD).balance;
        assertTrue(_stage(id) == SolverMarket.Stage.StepClaim, "solver's turn");
        vm.prank(verifier);
        vm.expectRevert(bytes("not the challenger's turn"));
        market.bisect(id, true);
        vm.prank(solverB);
        vm.expectRevert(bytes("only the disputed solver"));
        market.claimLeaf(id, bytes32(0), new bytes32[](0));
        vm.prank(referee);
        vm.expectRevert(bytes("dispute not narrowed to one operation"));
        market.resolve(id, true);
        // A claim that is not the committed leaf at mid is refused.
        bytes32[] memory leaves = _leaves(solverA, N);
        vm.prank(solverA);
        vm.expectRevert(bytes("bad Merkle proof"));
        market.claimLeaf(id, leaves[3], MerkleTree.proof(leaves, 3));
        // (0,8] -> mid 4 agree -> (4,8] -> mid 6 disagree -> (4,6] -> mid 5 agree -> (5,6].
        bool[3] memory answers = [true, false, true];
        for (uint256 i = 0; i < 3; ++i) {
            _claimLeaf(id);
            vm.prank(solverA);
            vm.expectRevert(bytes("not the solver's turn"));
            market.claimLeaf(id, bytes32("again"), new bytes32[](0));
            _bisect(id, answers[i]);
        }
        SolverMarket.DisputeView memory d = _dispute(id);
        assertEq(d.lo, 5, "lo");
        assertEq(d.hi, 6, "hi");
        assertEq(d.step, 6, "step");
        assertEq(d.loHash, leaves[5], "agreed leaf");
        assertEq(d.hiHash, leaves[6], "disputed leaf");
        assertTrue(d.stage == SolverMarket.Stage.OpsPost, "operation phase");
        // Operation phase over m = 10 operations: r_0 and r_10 are the contract's.
        vm.prank(solverA);
        vm.expectRevert(bytes("not the solver's turn"));
        market.claimOp(id, bytes32("r"));
        _postOps(id, 10, bytes32("r9"));
        d = _dispute(id);
        assertEq(d.loHash, market.opsStart(leaves[5]), "r_0");
        bytes32 record = market.commitRecordHash(bytes32("state"), bytes32("in"), bytes32("out"), leaves[6]);
        assertEq(d.hiHash, keccak256(abi.encodePacked(bytes32("r9"), record)), "r_m");
        assertEq(d.opCount, 10, "m");
        // (0,10] -> mid 5 agree -> (5,10] -> mid 7 disagree -> (5,7] -> mid 6 agree -> (6,7].
        bool[3] memory opAnswers = [true, false, true];
        for (uint256 i = 0; i < 3; ++i) {
            vm.prank(solverA);
            market.claimOp(id, keccak256(abi.encode("r", i)));
            vm.prank(solverA);
            vm.expectRevert(bytes("not the solver's turn"));
            market.claimOp(id, bytes32("again"));
            _bisect(id, opAnswers[i]);
        }
        d = _dispute(id);
        assertTrue(d.stage == SolverMarket.Stage.Referee, "referee's turn");
        assertEq(d.lo, 6, "op lo");
        assertEq(d.hi, 7, "op j");
        assertEq(d.loHash, keccak256(abi.encode("r", uint256(2))), "r_{j-1}");
        assertEq(d.hiHash, keccak256(abi.encode("r", uint256(1))), "r_j");
        vm.prank(stranger);
        vm.expectRevert(bytes("only the job's referee"));
        market.resolve(id, false);
        vm.prank(referee);
        market.resolve(id, false);
        assertEq(market.withdrawableOf(verifier), STAKE + STAKE / 2, "bond back plus half the slash");
        assertEq(address(0xdEaD).balance - burnBefore, STAKE / 2, "half burnt");
        vm.prank(referee);
        vm.expectRevert(bytes("dispute not narrowed to one operation"));
        market.resolve(id, true);
        // The slashed solver is not paid and cannot come back; its seat is refunded.
        vm.roll(block.number + 30);
        address[] memory solvers = new address[](1);
        solvers[0] = solverB;
        (, address[] memory verifiers) = _lists();
        market.finalize(jobId, solvers, verifiers);
        assertEq(market.withdrawableOf(solverA), 0, "slashed solver unpaid");
        assertEq(market.stakeOf(solverA), 9 ether, "slashed stake never returns");
        assertEq(market.withdrawableOf(submitter), PRICE, "slashed seat refunded");
    }

    function testRefereeSidesWithSolver() public {
        uint256 jobId = _postAndCommit();
        uint256 id = _challenge(jobId, 3, 4);
        assertTrue(_stage(id) == SolverMarket.Stage.OpsPost, "one step: operation phase at once");
        _postOps(id, 2, bytes32("r1"));
        _claimOpAndBisect(id, true); // (0,2] -> (1,2]
        vm.prank(referee);
        market.resolve(id, true);
        assertEq(market.withdrawableOf(solverA), STAKE / 2, "solver gets half the bond");
        assertEq(market.withdrawableOf(verifier), 0, "bond lost");
        vm.roll(block.number + 11);
        (address[] memory solvers, address[] memory verifiers) = _lists();
        market.finalize(jobId, solvers, verifiers);
        assertEq(market.withdrawableOf(solverA), STAKE / 2 + PRICE, "and its pay");
    }

    function _claimOpAndBisect(uint256 id, bool agree) internal {
        vm.prank(solverA);
        market.claimOp(id, bytes32("r-mid"));
        _bisect(id, agree);
    }

    function testOneOperationNeedsRZero() public {
        uint256 jobId = _postAndCommit();
        uint256 id = _challenge(jobId, 3, 4);
        vm.prank(solverA);
        vm.expectRevert(bytes("operation count must be > 0"));
        market.postOps(id, 0, 0, 0, 0, 0);
        vm.prank(solverA);
        vm.expectRevert(bytes("one operation: r_0 must precede it"));
        market.postOps(id, 1, bytes32("x"), 0, 0, 0);
        bytes32[] memory leaves = _leaves(solverA, N);
        _postOps(id, 1, market.opsStart(leaves[3]));
        assertTrue(_stage(id) == SolverMarket.Stage.Referee, "straight to the referee");
    }

    // ------------------------------------------------------------ deadlines

    /// Drives dispute ID to STAGE, then lets its party miss the turn.
    function _reach(uint256 id, SolverMarket.Stage stage) internal {
        while (_stage(id) != stage) {
            SolverMarket.Stage now_ = _stage(id);
            if (now_ == SolverMarket.Stage.StepClaim) _claimLeaf(id);
            else if (now_ == SolverMarket.Stage.StepBisect) _bisect(id, true);
            else if (now_ == SolverMarket.Stage.OpsPost) _postOps(id, 4, bytes32("r3"));
            else if (now_ == SolverMarket.Stage.OpsClaim) _claimOpAndBisectSolverOnly(id);
            else if (now_ == SolverMarket.Stage.OpsBisect) _bisect(id, false);
            else revert("unreachable stage");
        }
    }

    function _claimOpAndBisectSolverOnly(uint256 id) internal {
        vm.prank(solverA);
        market.claimOp(id, bytes32("r-mid"));
    }

    function _missTurn(SolverMarket.Stage stage, bool solverLoses) internal {
        uint256 jobId = _postAndCommit();
        uint256 id = _challenge(jobId, 0, 8);
        _reach(id, stage);
        vm.expectRevert(bytes("turn deadline not passed"));
        market.timeout(id);
        vm.roll(_dispute(id).deadline + 1);
        // The late move is refused.
        if (stage == SolverMarket.Stage.StepClaim) {
            vm.prank(solverA);
            vm.expectRevert(bytes("turn deadline passed"));
            market.claimLeaf(id, 0, new bytes32[](0));
        } else if (stage == SolverMarket.Stage.OpsPost) {
            vm.prank(solverA);
            vm.expectRevert(bytes("turn deadline passed"));
            market.postOps(id, 4, 0, 0, 0, 0);
        } else if (stage == SolverMarket.Stage.OpsClaim) {
            vm.prank(solverA);
            vm.expectRevert(bytes("turn deadline passed"));
            market.claimOp(id, 0);
        } else {
            vm.prank(verifier);
            vm.expectRevert(bytes("turn deadline passed"));
            market.bisect(id, true);
        }
        vm.prank(stranger);
        market.timeout(id);
        if (solverLoses) {
            assertEq(market.commitOf(jobId, solverA), bytes32(0), "timed-out solver's commit removed");
            assertEq(market.withdrawableOf(verifier), STAKE + STAKE / 2, "challenger rewarded");
        } else {
            assertEq(market.commitOf(jobId, solverA) != bytes32(0) ? 1 : 0, 1, "commit stands");
            assertEq(market.withdrawableOf(solverA), STAKE / 2, "solver rewarded");
            assertEq(market.withdrawableOf(verifier), 0, "bond lost");
        }
        vm.expectRevert(bytes("no turn to time out"));
        market.timeout(id);
    }

    function testSolverMissingStepClaimLoses() public {
        _missTurn(SolverMarket.Stage.StepClaim, true);
    }

    function testChallengerMissingStepBisectLosesBond() public {
        _missTurn(SolverMarket.Stage.StepBisect, false);
    }

    function testSolverMissingPostOpsLoses() public {
        _missTurn(SolverMarket.Stage.OpsPost, true);
    }

    function testSolverMissingOpClaimLoses() public {
        _missTurn(SolverMarket.Stage.OpsClaim, true);
    }

    function testChallengerMissingOpBisectLosesBond() public {
        _missTurn(SolverMarket.Stage.OpsBisect, false);
    }

    /// A silent referee cancels: the bond returns, nobody is slashed, the commit
    /// stands and is paid.
    function testRefereeTimeoutCancels() public {
        uint256 jobId = _postAndCommit();
        uint256 id = _challenge(jobId, 3, 4);
        _postOps(id, 2, bytes32("r1"));
        _claimOpAndBisect(id, false); // (0,2] -> (0,1]
        SolverMarket.DisputeView memory d = _dispute(id);
        assertTrue(d.stage == SolverMarket.Stage.Referee, "referee's turn");
        assertEq(d.deadline, block.number + TURN * 4, "referee blocks");
        vm.roll(d.deadline);
        vm.expectRevert(bytes("turn deadline not passed"));
        market.timeout(id);
        vm.roll(d.deadline + 1);
        vm.prank(referee);
        vm.expectRevert(bytes("referee deadline passed"));
        market.resolve(id, false);
        uint256 burnBefore = address(0xdEaD).balance;
        market.timeout(id);
        assertTrue(_stage(id) == SolverMarket.Stage.Closed, "closed");
        assertEq(market.withdrawableOf(verifier), STAKE, "bond back");
        assertEq(market.withdrawableOf(solverA), 0, "no reward");
        assertEq(address(0xdEaD).balance, burnBefore, "nothing burnt");
        vm.roll(block.number + 11);
        (address[] memory solvers, address[] memory verifiers) = _lists();
        market.finalize(jobId, solvers, verifiers);
        assertEq(market.withdrawableOf(solverA), PRICE, "commit stands, paid");
        assertEq(market.stakeOf(solverA), 10 ether, "stake unlocked");
    }

    // ------------------------------------------------------------ fuzz

    /// A dispute over N leaves and m operations ends in at most ⌈log2 N⌉ + ⌈log2 m⌉
    /// claim/bisect rounds, whatever the challenger answers.
    function testFuzzRoundsAreLogarithmic(uint16 n, uint48 m, uint256 answers, uint256 span) public {
        n = uint16(bound(n, 2, 1500));
        m = uint48(bound(m, 1, 1 << 40));
        bytes32[] memory leaves = _leaves(solverA, n);
        bytes32[][] memory levels = MerkleTree.levels(leaves);
        vm.prank(submitter);
        uint256 jobId = market.postJob{value: PRICE + FEE}(1, 1, PRICE, FEE, STAKE, 20, 400, referee, 0);
        vm.prank(solverA);
        market.commit(jobId, levels[levels.length - 1][0], n, true);
        vm.roll(block.number + 2);
        vm.prank(verifier);
        market.accept(jobId);
        uint48 lo = uint48(span % (n - 1));
        uint48 hi = uint48(lo + 1 + (span >> 32) % (n - 1 - lo));
        vm.prank(verifier);
        uint256 id = market.challenge{value: STAKE}(
            jobId, solverA, lo, leaves[lo], MerkleTree.proofFrom(levels, lo), hi, leaves[hi],
            MerkleTree.proofFrom(levels, hi)
        );
        uint256 rounds = 0;
        while (_stage(id) == SolverMarket.Stage.StepClaim) {
            SolverMarket.DisputeView memory d = _dispute(id);
            uint256 mid = (uint256(d.lo) + d.hi) / 2;
            vm.prank(solverA);
            market.claimLeaf(id, leaves[mid], MerkleTree.proofFrom(levels, mid));
            _bisect(id, (answers >> (rounds % 256)) & 1 == 1);
            ++rounds;
        }
        assertTrue(_stage(id) == SolverMarket.Stage.OpsPost, "one step");
        assertTrue(rounds <= _ceilLog2(n), "step rounds");
        _postOps(id, m, m == 1 ? market.opsStart(_dispute(id).loHash) : bytes32("rPrev"));
        uint256 opRounds = 0;
        while (_stage(id) == SolverMarket.Stage.OpsClaim) {
            vm.prank(solverA);
            market.claimOp(id, keccak256(abi.encode(opRounds)));
            _bisect(id, (answers >> ((rounds + opRounds) % 256)) & 2 == 2);
            ++opRounds;
        }
        assertTrue(_stage(id) == SolverMarket.Stage.Referee, "one operation");
        assertTrue(opRounds <= _ceilLog2(m), "operation rounds");
        SolverMarket.DisputeView memory end = _dispute(id);
        assertEq(end.hi - end.lo, 1, "one apart");
    }

    function _ceilLog2(uint256 x) internal pure returns (uint256 r) {
        while ((uint256(1) << r) < x) ++r;
    }

    function testFuzzEscrowAndRefund(uint16 solverCount, uint16 verifierCount, uint64 price, uint64 fee, uint8 commits)
        public
    {
        solverCount = uint16(bound(solverCount, 1, 50));
        verifierCount = uint16(bound(verifierCount, 0, 50));
        commits = uint8(bound(commits, 0, solverCount < 3 ? solverCount : 3));
        uint256 escrow = uint256(solverCount) * price + uint256(verifierCount) * fee;
        vm.deal(submitter, escrow);
        vm.prank(submitter);
        uint256 jobId = market.postJob{value: escrow}(solverCount, verifierCount, price, fee, STAKE, 5, 3, referee, 0);
        address[3] memory all = [solverA, solverB, verifier];
        address[] memory solvers = new address[](commits);
        for (uint256 i = 0; i < commits; ++i) {
            vm.prank(all[i]);
            market.commit(jobId, bytes32(i + 100), N, true);
            solvers[i] = all[i];
        }
        vm.roll(block.number + 10);
        uint256 held = address(market).balance;
        market.finalize(jobId, solvers, new address[](0));
        uint256 credited = market.withdrawableOf(submitter);
        for (uint256 i = 0; i < commits; ++i) credited += market.withdrawableOf(all[i]);
        assertEq(credited, escrow, "escrow fully accounted");
        assertEq(address(market).balance, held, "nothing left the contract");
    }

    function testFuzzUnstakeNeverExceedsStake(uint128 amount) public {
        vm.prank(solverA);
        if (amount == 0) {
            vm.expectRevert(bytes("amount must be > 0"));
        } else if (amount > 10 ether) {
            vm.expectRevert(bytes("amount exceeds free stake"));
        }
        market.unstake(amount);
    }

    function bound(uint256 x, uint256 lo, uint256 hi) internal pure returns (uint256) {
        return lo + x % (hi - lo + 1);
    }
}
